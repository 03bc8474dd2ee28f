"""Delivery: the disk spool, retries, poison payloads — against the real server on loopback."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import pytest

from agents.gpu_sampler import GpuSampler
from agents.nvml import NVML
from agents.otlp_encode import MetricPoint, encode_metrics
from agents.sender import ItemQueue, Sender, classify, retry_after_seconds
from agents.spool import Spool

try:
    from tests import fake_nvml
except ImportError:  # pragma: no cover - depends on how pytest was started
    import fake_nvml  # type: ignore[no-redef]

RES = {"host.name": "node-spool", "service.name": "tailscope-agent", "service.instance.id": "node-spool"}


def wait_for(cond, timeout: float = 20.0, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


# --- the spool alone ------------------------------------------------------------
def test_spool_is_ordered_and_survives_a_restart(tmp_path):
    sp = Spool(tmp_path / "s", max_bytes=10_000)
    for i in range(5):
        assert sp.put("metrics" if i % 2 else "logs", bytes([i]) * 100)
    (tmp_path / "s" / "00000000000000000099-metrics.tmp").write_bytes(b"half-written")
    again = Spool(tmp_path / "s", max_bytes=10_000)
    items = again.items()
    assert [i.read()[0] for i in items] == [0, 1, 2, 3, 4]
    assert [i.kind for i in items] == ["logs", "metrics", "logs", "metrics", "logs"]
    assert again.bytes == 500
    assert not list((tmp_path / "s").glob("*.tmp"))  # an interrupted write is discarded, never sent
    again.put("metrics", b"x")
    assert again.items()[-1].seq == 6  # sequence continues after a restart
    again.remove(items[0])
    assert again.oldest() == items[1] and len(again) == 5


def test_full_spool_drops_oldest_and_counts(tmp_path):
    sp = Spool(tmp_path / "s", max_bytes=1000)
    for i in range(10):
        sp.put("metrics", bytes([i]) * 300)
    kept = [i.read()[0] for i in sp.items()]
    assert kept == [7, 8, 9]  # newest kept
    assert sp.bytes == 900 <= sp.max_bytes
    assert sp.dropped_payloads == 7 and sp.dropped_bytes == 2100
    assert not sp.put("metrics", b"y" * 1001)  # larger than the whole spool: dropped itself
    assert sp.dropped_payloads == 8
    assert [i.read()[0] for i in sp.items()] == [7, 8, 9]


def test_drop_counters_go_out_as_agent_metrics(tmp_path):
    sp = Spool(tmp_path / "s", max_bytes=1000)
    for i in range(5):
        sp.put("metrics", bytes([i]) * 400)
    q = ItemQueue(maxsize=1)
    assert q.submit("a") and not q.submit("b")
    sender = Sender("http://127.0.0.1:9", None, sp, q, RES)
    pts = {(p.name, dict(p.attributes).get("reason")): p for p in sender.own_metrics(time.time_ns())}
    assert pts[("tailscope.agent.spool.dropped", "spool_full")].value == 3
    assert pts[("tailscope.agent.spool.dropped", "spool_full")].kind == "sum"
    assert pts[("tailscope.agent.spool.dropped", "spool_full")].monotonic
    assert pts[("tailscope.agent.spool.dropped", "queue_full")].value == 1
    assert pts[("tailscope.agent.spool.dropped", "poison")].value == 0
    assert pts[("tailscope.agent.spool.dropped", "spool_error")].value == 0
    assert pts[("tailscope.agent.spool.bytes", None)].value == 800
    assert pts[("tailscope.agent.spool.sent", None)].value == 0
    sender.client.close()


def test_status_classification_and_retry_after():
    assert classify(200) == "ok" and classify(204) == "ok"
    assert classify(429) == classify(503) == classify(500) == classify(408) == "retry"
    assert classify(400) == classify(413) == classify(404) == "poison"
    assert classify(401) == classify(403) == "auth"
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: retry now


# --- against the real server ---------------------------------------------------------
@pytest.mark.slow
def test_server_outage_every_sample_arrives_exactly_once(make_server, tmp_path):
    srv = make_server()
    port, db = srv.port, srv.server.config.db
    nvml = NVML(fake_nvml.FakeNvml(gpus=2))
    spool = Spool(tmp_path / "spool", max_bytes=64 * 1024 * 1024)
    queue = ItemQueue(100_000)
    sender = Sender(srv.url, None, spool, queue, RES, flush_interval=0.1, backoff_base=0.05, backoff_max=0.4, timeout=5)
    produced: list[MetricPoint] = []
    lock = threading.Lock()

    def submit(p: MetricPoint) -> bool:
        with lock:
            produced.append(p)
        return queue.submit(p)

    sampler = GpuSampler(nvml, RES, interval=0.05, submit=submit)
    sender.start()
    sampler.start()
    try:
        assert wait_for(lambda: sender.counters.sent_payloads >= 3), "nothing delivered while the server was up"
        srv.stop()
        assert wait_for(lambda: sender.counters.failures >= 1 and len(spool) >= 5), "payloads were not spooled during the outage"
        spooled_during_outage = len(spool)
        srv2 = make_server(db=db, port=port)
        assert wait_for(lambda: sender.counters.sent_payloads >= 3 + spooled_during_outage)
        time.sleep(0.3)  # a few more samples after the restart
    finally:
        sampler.stop()
    assert sender.flush(30), f"spool not drained: {len(spool)} payloads left"
    sender.stop(2)
    with lock:
        expected = sorted((p.name, dict(p.attributes)["gpu.index"], dict(p.attributes).get("process.pid"), p.time_unix_nano // 1000)
                          for p in produced)
    assert len(expected) > 200
    rows = srv2.sql(
        "SELECT name, gpu_index, point_pid, epoch_us(time) FROM metrics "
        "WHERE name LIKE 'tailscope.gpu.%' AND host_name = 'node-spool'")
    got = sorted((r[0], r[1], r[2], r[3]) for r in rows)
    assert len(got) == len(expected), f"{len(got)} rows stored for {len(expected)} samples"
    assert got == expected  # every sample exactly once
    own = srv2.sql("SELECT max(value) FROM metrics WHERE name = 'tailscope.agent.spool.sent'")
    assert own[0][0] is not None and own[0][0] >= 3
    assert sender.counters.poison_payloads == 0 and spool.dropped_payloads == 0


def test_poison_payload_is_dropped_and_counted_and_does_not_block(make_server, tmp_path):
    srv = make_server()
    spool = Spool(tmp_path / "spool")
    queue = ItemQueue(1000)
    sender = Sender(srv.url, None, spool, queue, RES, flush_interval=0.05, backoff_base=0.05)
    spool.put("metrics", b"\xff\xfe this is not protobuf")
    good = MetricPoint.make("tailscope.gpu.temperature", 61, time.time_ns(), {"gpu.index": 3, "gpu.uuid": "GPU-x", "gpu.name": "t"}, RES)
    spool.put("metrics", encode_metrics([good]))
    assert sender.drain(budget_s=10) == 1
    assert sender.counters.poison_payloads == 1 and len(spool) == 0
    assert srv.sql("SELECT value FROM metrics WHERE name = 'tailscope.gpu.temperature' AND gpu_index = 3") == [(61.0,)]
    pts = {(p.name, dict(p.attributes).get("reason")): p.value for p in sender.own_metrics(time.time_ns())}
    assert pts[("tailscope.agent.spool.dropped", "poison")] == 1
    sender.client.close()


class _Scripted(http.server.BaseHTTPRequestHandler):
    """A loopback HTTP server answering from a script of (status, headers)."""

    script: list[tuple[int, dict[str, str]]] = []
    seen: list[tuple[float, str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen.append((time.monotonic(), self.path, body))
        status, headers = type(self).script.pop(0) if type(self).script else (200, {})
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_retry_after_is_honoured_and_payload_kept_until_200(tmp_path):
    _Scripted.script = [(503, {"Retry-After": "1"}), (429, {"Retry-After": "1"}), (200, {})]
    _Scripted.seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        spool = Spool(tmp_path / "spool")
        sender = Sender(f"http://127.0.0.1:{httpd.server_address[1]}", "s3cret", spool, ItemQueue(10), RES,
                        backoff_base=0.01, backoff_max=0.02)
        spool.put("logs", b"payload-1")
        sender.start()
        assert wait_for(lambda: len(spool) == 0, timeout=15)
        sender.stop(1)
    finally:
        httpd.shutdown()
        httpd.server_close()
    times = [s[0] for s in _Scripted.seen]
    assert [s[1] for s in _Scripted.seen] == ["/v1/logs"] * 3
    assert all(s[2] == b"payload-1" for s in _Scripted.seen)
    # the backoff alone would retry within 20 ms; Retry-After: 1 makes it wait a second each time
    assert times[1] - times[0] >= 0.95 and times[2] - times[1] >= 0.95
    assert sender.counters.sent_payloads == 1 and sender.counters.failures == 2


def test_stop_spools_what_is_in_memory_for_the_next_run(tmp_path):
    spool = Spool(tmp_path / "spool")
    queue = ItemQueue(100)
    sender = Sender("http://127.0.0.1:9", None, spool, queue, RES, flush_interval=60, backoff_base=0.01)
    sender.start()
    for i in range(5):
        queue.submit(MetricPoint.make("tailscope.gpu.power", float(i), time.time_ns(), {"gpu.index": 0}, RES))
    sender.stop(0.2)
    assert len(Spool(tmp_path / "spool")) >= 1  # nothing lost: it waits on disk for the next run


def test_wrong_token_keeps_payloads_until_the_token_is_fixed(make_server, tmp_path):
    srv = make_server(tokens="right-token")
    spool = Spool(tmp_path / "spool")
    sender = Sender(srv.url, "wrong-token", spool, ItemQueue(10), RES, backoff_max=0.2)
    point = MetricPoint.make("tailscope.gpu.temperature", 55, time.time_ns(), {"gpu.index": 5}, RES)
    spool.put("metrics", encode_metrics([point]))
    assert sender.drain(budget_s=5) == 0
    assert len(spool) == 1 and sender.counters.poison_payloads == 0  # kept, not dropped
    sender.token = "right-token"
    assert wait_for(lambda: sender.drain(budget_s=5) == 1 or not len(spool), timeout=5)
    assert len(spool) == 0
    assert srv.sql("SELECT value FROM metrics WHERE gpu_index = 5") == [(55.0,)]
    sender.client.close()


def test_an_unwritable_spool_is_counted_not_fatal(tmp_path, caplog):
    spool = Spool(tmp_path / "spool")
    queue = ItemQueue(10)
    sender = Sender("http://127.0.0.1:9", None, spool, queue, RES)
    spool.dir = tmp_path / "gone" / "spool"  # the directory vanished (unmounted, deleted)
    queue.submit(MetricPoint.make("tailscope.gpu.power", 1.0, time.time_ns(), {"gpu.index": 0}, RES))
    sender._gather(0.1)
    with caplog.at_level("ERROR"):
        sender._spool_pending()
    assert sender.counters.spool_errors == 1
    assert any("cannot write to the spool" in r.message for r in caplog.records)
    sender.client.close()


def test_flush_answers_while_the_sender_thread_is_idle(make_server, tmp_path):
    """flush() used to poll a lock the sender thread re-took at once and could starve for minutes."""
    srv = make_server()
    spool = Spool(tmp_path / "spool", fsync=False)
    queue = ItemQueue(1000)
    sender = Sender(srv.url, None, spool, queue, RES, flush_interval=60.0)
    sender.start()
    try:
        for round_ in range(20):
            queue.submit(MetricPoint("tailscope.gpu.utilization", float(round_), time.time_ns(),
                                     (("gpu.index", 0),)))
            assert sender.flush(10), f"round {round_}: flush did not come back ({len(spool)} spooled)"
            assert len(spool) == 0 and queue.qsize() == 0
    finally:
        sender.stop(2)
    assert sender.counters.sent_payloads == 20


def test_flush_without_a_thread_spools_and_sends(make_server, tmp_path):
    srv = make_server()
    spool = Spool(tmp_path / "spool", fsync=False)
    queue = ItemQueue(10)
    sender = Sender(srv.url, None, spool, queue, RES)
    queue.submit(MetricPoint("tailscope.gpu.utilization", 1.0, time.time_ns(), (("gpu.index", 0),)))
    assert sender.flush(10) and len(spool) == 0 and sender.counters.sent_payloads == 1
    sender.client.close()

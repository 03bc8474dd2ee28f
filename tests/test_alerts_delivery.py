"""Delivery to a real HTTP receiver on loopback: signatures, retries, the outbox across restarts, redirects.

The alert service runs for real (SQLite control DB file, sender thread,
httpx); incidents come from the scripted source of test_alerts_evaluator
(the end-to-end test uses the real analyzer).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from analyzer.alerts import signing
from analyzer.alerts.service import AlertService
from tailscope.config import load
from tailscope.errors import BadRequest
from test_alerts_evaluator import ScriptedIncidents, incident
from test_alerts_receiver import Receiver

SECRET = "s3cr3t-hmac-key-7f1"


def make_service(tmp_path: Path, source: Any, sender: dict[str, Any] | None = None, **settings: Any) -> AlertService:
    settings.setdefault("db", str(tmp_path / "store.duckdb"))
    settings.setdefault("alert_interval_s", 1)
    return AlertService(load(settings, environ={}), source, sender_options=sender)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def services() -> Iterator[list[AlertService]]:
    started: list[AlertService] = []
    yield started
    for s in started:
        s.stop()


def status_of(svc: AlertService) -> str | None:
    """Status of the newest delivery (None before the evaluator wrote one)."""
    rows = svc.list_deliveries()
    return rows[0]["status"] if rows else None


def wait_until(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_signed_delivery_verifies(tmp_path: Path, receiver: Receiver, services: list[AlertService]) -> None:
    source = ScriptedIncidents()
    svc = make_service(tmp_path, source, public_url="http://dash.example:8080")
    services.append(svc)
    svc.add_webhook(receiver.url + "/hook", SECRET)
    source.items = [incident()]
    svc.start()
    got = receiver.wait_for(lambda rs: len(rs) >= 1)[0]
    ts, sig = got.header(signing.TIMESTAMP_HEADER), got.header(signing.SIGNATURE_HEADER)
    assert ts and sig and sig.startswith("sha256=")
    # verified independently of our own helper: HMAC(secret, ts + "." + raw body)
    expected = "sha256=" + hmac.new(SECRET.encode(), ts.encode() + b"." + got.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(sig, expected)
    assert signing.verify(SECRET, ts, got.body, sig)
    assert not signing.verify("wrong-secret", ts, got.body, sig)
    assert not signing.verify(SECRET, ts, got.body + b" ", sig)  # a tampered body fails
    assert not signing.verify(SECRET, ts, got.body, sig, now=int(ts) + 3600)  # a replay an hour later fails
    assert abs(int(ts) - time.time()) < 60
    body = got.json()
    assert body["event"] == "open" and body["incident"]["id"] == "inc-1"
    assert body["top_causes"][0]["cause"] == "compile_miss"
    assert body["url"] == "http://dash.example:8080/dashboard/incident/inc-1"
    assert got.header("Idempotency-Key") == f"tailscope-alert-{body['alert']['id']}-1"
    assert got.header("X-Tailscope-Event") == "open"
    assert got.header("Content-Type") == "application/json"
    wait_until(lambda: status_of(svc) == "delivered")


def test_receiver_that_fails_then_recovers_gets_the_alert_once(tmp_path: Path, services: list[AlertService]) -> None:
    receiver = Receiver([500, 503, 429])
    try:
        source = ScriptedIncidents()
        svc = make_service(tmp_path, source)  # default backoff: 1 s base, doubling, jittered
        services.append(svc)
        svc.add_webhook(receiver.url + "/hook", SECRET)
        source.items = [incident()]
        svc.start()
        receiver.wait_for(lambda rs: any(r.status == 200 for r in rs), timeout=30)
        # keep evaluating the still-open incident for a while: nothing more must arrive
        for _ in range(3):
            svc.evaluate_now()
        time.sleep(1.5)
        assert [r.status for r in receiver.received] == [500, 503, 429, 200]
        assert len({r.header("Idempotency-Key") for r in receiver.received}) == 1
        assert [r.header("X-Tailscope-Attempt") for r in receiver.received] == ["1", "2", "3", "4"]
        assert len({r.body for r in receiver.received}) == 1  # the same bytes every time
        d = svc.list_deliveries()
        assert len(d) == 1 and d[0]["status"] == "delivered" and d[0]["attempts"] == 4
    finally:
        receiver.close()


def test_restart_mid_retry_still_delivers_exactly_once(tmp_path: Path, services: list[AlertService]) -> None:
    receiver = Receiver(default_status=500)
    try:
        source = ScriptedIncidents()
        first = make_service(tmp_path, source)
        services.append(first)
        first.add_webhook(receiver.url + "/hook", SECRET)
        source.items = [incident()]
        first.start()
        receiver.wait_for(lambda rs: len(rs) >= 1)
        first.stop()  # the server goes down while the delivery waits for its retry
        n_before = len(receiver.received)
        assert all(r.status == 500 for r in receiver.received)
        pending = [d for d in AlertService(load({"db": str(tmp_path / "store.duckdb")}, environ={}), None).list_deliveries() if d["status"] == "pending"]
        assert len(pending) == 1
        receiver.default_status = 200
        second = make_service(tmp_path, source)  # same control DB file: the outbox survives
        services.append(second)
        second.start()
        receiver.wait_for(lambda rs: len(rs) > n_before and rs[-1].status == 200, timeout=30)
        for _ in range(3):
            second.evaluate_now()
        time.sleep(1.0)
        assert len(receiver.ok()) == 1
        keys = {r.header("Idempotency-Key") for r in receiver.received}
        assert len(keys) == 1
        assert len(second.list_alerts()) == 1  # the restarted evaluator knows the alert: no second one
    finally:
        receiver.close()


def test_alert_committed_before_any_send_survives_a_stop(tmp_path: Path, receiver: Receiver, services: list[AlertService]) -> None:
    source = ScriptedIncidents()
    first = make_service(tmp_path, source)
    services.append(first)
    first.add_webhook(receiver.url + "/hook", SECRET)
    source.items = [incident()]
    first.evaluate_now()  # decided and written to the outbox, never sent (no sender running)
    first.stop()
    assert receiver.received == []
    second = make_service(tmp_path, source)
    services.append(second)
    second.start()
    receiver.wait_for(lambda rs: len(rs) == 1)
    time.sleep(0.5)
    assert len(receiver.received) == 1


def test_redirect_to_another_host_is_not_followed(tmp_path: Path, services: list[AlertService]) -> None:
    other = Receiver()
    bouncer = Receiver([("redirect", 307, other.url + "/stolen")])
    try:
        source = ScriptedIncidents()
        svc = make_service(tmp_path, source)
        services.append(svc)
        svc.add_webhook(bouncer.url + "/hook", SECRET)
        source.items = [incident()]
        svc.start()
        wait_until(lambda: status_of(svc) == "failed")
        d = svc.list_deliveries()[0]
        assert "redirect to another host refused" in d["last_error"] and d["last_status_code"] == 307
        assert d["attempts"] == 1  # a permanent failure: not retried
        assert other.received == []
    finally:
        other.close()
        bouncer.close()


def test_redirect_within_the_same_origin_is_followed(tmp_path: Path, services: list[AlertService]) -> None:
    r = Receiver([("redirect", 308, "/moved")])
    try:
        source = ScriptedIncidents()
        svc = make_service(tmp_path, source)
        services.append(svc)
        svc.add_webhook(r.url + "/hook", SECRET)
        source.items = [incident()]
        svc.start()
        r.wait_for(lambda rs: len(rs) == 2)
        assert [x.path for x in r.received] == ["/hook", "/moved"]
        assert r.received[1].body == r.received[0].body
        wait_until(lambda: status_of(svc) == "delivered")
    finally:
        r.close()


def test_timeout_is_retried(tmp_path: Path, services: list[AlertService]) -> None:
    r = Receiver([("delay", 200, 1.5)])
    try:
        source = ScriptedIncidents()
        svc = make_service(tmp_path, source, sender={"timeout_s": 0.5, "backoff_base_s": 0.2})
        services.append(svc)
        svc.add_webhook(r.url + "/hook", SECRET)
        source.items = [incident()]
        svc.start()
        wait_until(lambda: status_of(svc) == "delivered")
        d = svc.list_deliveries()[0]
        assert d["attempts"] == 2
        assert len(r.ok()) == 1
    finally:
        r.close()


def test_client_error_fails_without_retry(tmp_path: Path, services: list[AlertService]) -> None:
    r = Receiver(default_status=404)
    try:
        source = ScriptedIncidents()
        svc = make_service(tmp_path, source)
        services.append(svc)
        svc.add_webhook(r.url + "/gone", "")
        source.items = [incident()]
        svc.start()
        wait_until(lambda: status_of(svc) == "failed")
        d = svc.list_deliveries()[0]
        assert d["attempts"] == 1 and d["last_status_code"] == 404
        assert r.received[0].header(signing.SIGNATURE_HEADER) is None  # no secret: unsigned, but timestamped
        assert r.received[0].header(signing.TIMESTAMP_HEADER)
    finally:
        r.close()


def test_allow_list_refuses_other_hosts(tmp_path: Path, receiver: Receiver, services: list[AlertService]) -> None:
    svc = make_service(tmp_path, ScriptedIncidents(), webhook_allow_hosts="hooks.example.com,*.corp.example")
    services.append(svc)
    with pytest.raises(BadRequest, match="not in --webhook-allow-hosts"):
        svc.add_webhook(receiver.url + "/hook")
    assert svc.add_webhook("https://hooks.example.com/x")["id"]
    assert svc.add_webhook("https://a.b.corp.example/x")["id"]
    ok = make_service(tmp_path / "b", ScriptedIncidents(), webhook_allow_hosts=f"127.0.0.1:{receiver.port}")
    services.append(ok)
    assert ok.add_webhook(receiver.url + "/hook")["id"]


def test_secrets_and_webhook_paths_never_reach_logs_or_listings(tmp_path: Path, receiver: Receiver, services: list[AlertService], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bad = Receiver(default_status=500)
    try:
        source = ScriptedIncidents()
        svc = make_service(tmp_path, source, sender={"max_attempts": 2, "backoff_base_s": 0.1})
        services.append(svc)
        token_path = "/services/T0001/B0002/tokentokentoken"
        hook = svc.add_webhook(bad.url + token_path + "?key=qsecret", SECRET, "slack")
        assert "secret" not in hook and hook["has_secret"] is True
        listed = json.dumps(svc.list_webhooks())
        assert SECRET not in listed and "tokentokentoken" not in listed and "qsecret" not in listed
        source.items = [incident()]
        svc.start()
        wait_until(lambda: status_of(svc) == "failed")
        svc.test_webhook(hook["id"])
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "delivery" in text  # the sender did log
        for needle in (SECRET, "tokentokentoken", "qsecret"):
            assert needle not in text
            assert needle not in json.dumps(svc.list_deliveries())
    finally:
        bad.close()


def test_test_send_reaches_the_receiver_signed(tmp_path: Path, receiver: Receiver, services: list[AlertService]) -> None:
    svc = make_service(tmp_path, None, public_url="http://dash.example")
    services.append(svc)
    hook = svc.add_webhook(receiver.url + "/hook", SECRET, "alertmanager")
    out = svc.test_webhook(hook["id"])
    assert out["ok"] is True and out["status_code"] == 200
    got = receiver.received[0]
    assert signing.verify(SECRET, got.header(signing.TIMESTAMP_HEADER), got.body, got.header(signing.SIGNATURE_HEADER))
    body = got.json()
    assert isinstance(body, list) and body[0]["labels"]["alertname"] == "TailscopeP99Incident"
    assert body[0]["generatorURL"].startswith("http://dash.example/dashboard/incident/")
    assert svc.list_deliveries()[0]["event"] == "test"


def test_rows_of_one_alert_go_in_order(tmp_path: Path, services: list[AlertService]) -> None:
    """A resolution never overtakes the open it follows, even while the open is being retried."""
    r = Receiver([500, 500])
    try:
        source = ScriptedIncidents()
        svc = make_service(tmp_path, source, alert_hold_down_s=0, sender={"backoff_base_s": 0.3})
        services.append(svc)
        svc.add_webhook(r.url + "/hook", SECRET)
        source.items = [incident()]
        svc.evaluate_now()
        source.items = [incident(open=False)]
        assert svc.evaluate_now()["resolved"]
        svc.start()
        r.wait_for(lambda rs: sum(1 for x in rs if x.status == 200) == 2, timeout=30)
        events = [x.json()["event"] for x in r.received if x.status == 200]
        assert events == ["open", "resolved"]
    finally:
        r.close()


def test_a_huge_error_reply_is_not_buffered(tmp_path: Path) -> None:
    """A receiver answering 500 with a 50 MB body: the sender reads a few KB and records a short error."""
    import http.server
    import threading

    written: list[int] = []
    done = threading.Event()

    class Huge(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(500)
            self.send_header("Content-Length", str(50 * 1024 * 1024))
            self.end_headers()
            n = 0
            try:
                for _ in range(50 * 16):
                    self.wfile.write(b"x" * 65536)
                    n += 65536
            except OSError:  # the sender hung up after reading what it needed
                pass
            written.append(n)
            done.set()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Huge)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    svc = make_service(tmp_path, None)
    try:
        result = svc.sender.send(f"http://127.0.0.1:{httpd.server_address[1]}/hook", "k", b"{}", event="test", idempotency_key="k1")
        assert result.ok is False and result.retry is True and result.status_code == 500
        assert result.error is not None and len(result.error) < 300 and result.error.startswith("HTTP 500: xxx")
        assert done.wait(10)
        assert written[0] < 40 * 1024 * 1024  # the rest was never read (socket buffers hold a few MB at most)
    finally:
        svc.stop()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

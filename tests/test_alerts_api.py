"""The alerts API and the ``tailscope alerts`` CLI against a real server on loopback."""

from __future__ import annotations

import json
from typing import Any, Iterator

import httpx
import pytest

from analyzer.alerts import signing
from analyzer.alerts.cli import parse_duration
from tailscope.cli import main as tailscope_main
from test_alerts_receiver import Receiver

API = "/api/v1/alerts"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_one_call_adds_a_webhook_and_the_secret_never_comes_back(make_server: Any, receiver: Receiver) -> None:
    srv = make_server()
    r = httpx.post(srv.url + API + "/webhooks", json={"url": receiver.url + "/hook", "secret": "topsecret", "format": "generic"})
    assert r.status_code == 201, r.text
    hook = r.json()["webhook"]
    assert hook["format"] == "generic" and hook["has_secret"] is True
    assert "topsecret" not in r.text
    listed = httpx.get(srv.url + API + "/webhooks")
    assert listed.status_code == 200 and "topsecret" not in listed.text
    assert [h["id"] for h in listed.json()["webhooks"]] == [hook["id"]]
    assert "topsecret" not in httpx.get(srv.url + API + f"/webhooks/{hook['id']}").text
    rules = httpx.get(srv.url + API + "/rules").json()
    assert rules == {"rules": [], "default_rule_active": True}
    # test-send: signed, received, logged
    t = httpx.post(srv.url + API + f"/webhooks/{hook['id']}/test")
    assert t.status_code == 200 and t.json()["ok"] is True
    got = receiver.received[-1]
    assert signing.verify("topsecret", got.header(signing.TIMESTAMP_HEADER), got.body, got.header(signing.SIGNATURE_HEADER))
    body = got.json()
    assert body["url"].startswith(srv.url + "/dashboard/incident/")  # port 0: the URL the API was reached at
    deliveries = httpx.get(srv.url + API + "/deliveries").json()["deliveries"]
    assert deliveries[0]["event"] == "test" and deliveries[0]["status"] == "delivered"
    # rotate the secret and disable: the next test-send is signed with the new key
    p = httpx.patch(srv.url + API + f"/webhooks/{hook['id']}", json={"secret": "rotated", "enabled": False})
    assert p.status_code == 200 and p.json()["webhook"]["enabled"] is False and "rotated" not in p.text
    assert httpx.post(srv.url + API + f"/webhooks/{hook['id']}/test").json()["ok"] is True
    got = receiver.received[-1]
    assert signing.verify("rotated", got.header(signing.TIMESTAMP_HEADER), got.body, got.header(signing.SIGNATURE_HEADER))
    assert not signing.verify("topsecret", got.header(signing.TIMESTAMP_HEADER), got.body, got.header(signing.SIGNATURE_HEADER))
    bad = httpx.patch(srv.url + API + f"/webhooks/{hook['id']}", json={"format": "teams"})
    assert bad.status_code == 400 and "format" in bad.json()["error"]
    d = httpx.delete(srv.url + API + f"/webhooks/{hook['id']}")
    assert d.status_code == 200 and d.json() == {"ok": True, "deleted": hook["id"]}
    assert httpx.get(srv.url + API + "/webhooks").json()["webhooks"] == []


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"url": "ftp://x/y"}, "http:// or https://"),
        ({"url": "http:///nohost"}, "no host"),
        ({"url": "http://127.0.0.1:1/x", "format": "teams"}, "format"),
        ({"secret": "x"}, "url"),
        ({"url": "http://127.0.0.1:1/x", "bogus": 1}, "bogus"),
    ],
)
def test_bad_webhooks_are_refused_with_a_clear_message(make_server: Any, body: dict, needle: str) -> None:
    srv = make_server()
    r = httpx.post(srv.url + API + "/webhooks", json=body)
    assert r.status_code == 400, r.text
    out = r.json()
    assert out["ok"] is False and out["status"] == 400 and needle in out["error"]


def test_rules_crud_and_validation(make_server: Any) -> None:
    srv = make_server()
    hook = httpx.post(srv.url + API + "/webhooks", json={"url": "http://127.0.0.1:1/x"}).json()["webhook"]
    body = {"name": "chat slo", "service": "chat-api", "slo_ms": 800, "window_s": 60, "min_requests": 50, "causes": ["compile_miss", "kv_eviction"], "webhook_ids": [hook["id"]]}
    r = httpx.post(srv.url + API + "/rules", json=body)
    assert r.status_code == 201, r.text
    rule = r.json()["rule"]
    assert {k: rule[k] for k in body} == body
    assert httpx.get(srv.url + API + "/rules").json()["default_rule_active"] is False
    put = httpx.put(srv.url + API + f"/rules/{rule['id']}", json={**body, "slo_ms": 900, "causes": []})
    assert put.status_code == 200 and put.json()["rule"]["slo_ms"] == 900 and put.json()["rule"]["causes"] == []
    assert httpx.get(srv.url + API + f"/rules/{rule['id']}").json()["rule"]["slo_ms"] == 900
    for bad, needle in (
        ({"causes": ["cosmic_rays"]}, "unknown cause"),
        ({"spike_factor": 0.5}, "spike_factor"),
        ({"slo_ms": -3}, "slo_ms"),
        ({"webhook_ids": [999]}, "no webhook with id 999"),
        ({"min_requests": -1}, "min_requests"),
    ):
        r = httpx.post(srv.url + API + "/rules", json=bad)
        assert r.status_code == 400 and needle in r.json()["error"], (bad, r.text)
    assert httpx.delete(srv.url + API + f"/rules/{rule['id']}").json() == {"ok": True, "deleted": rule["id"]}
    missing = httpx.get(srv.url + API + f"/rules/{rule['id']}")
    assert missing.status_code == 404 and missing.json()["error"] == f"no rule with id {rule['id']}"


def test_silences_alerts_and_acks(make_server: Any) -> None:
    srv = make_server()
    r = httpx.post(srv.url + API + "/silences", json={"service": "chat-api", "duration_s": 3600, "comment": "deploy"})
    assert r.status_code == 201, r.text
    sil = r.json()["silence"]
    assert sil["active"] is True and sil["service"] == "chat-api"
    assert [s["id"] for s in httpx.get(srv.url + API + "/silences").json()["silences"]] == [sil["id"]]
    assert httpx.delete(srv.url + API + f"/silences/{sil['id']}").json()["silence"]["active"] is False
    assert httpx.get(srv.url + API + "/silences").json()["silences"] == []
    assert len(httpx.get(srv.url + API + "/silences", params={"include_expired": "true"}).json()["silences"]) == 1
    for bad, needle in (({"service": "x"}, "duration_s"), ({"cause": "nope", "duration_s": 5}, "unknown cause"), ({"service": "x", "ends_at": "2001-01-01T00:00:00Z"}, "not in the future"), ({"service": "x", "ends_at": "tomorrow"}, "RFC 3339")):
        r = httpx.post(srv.url + API + "/silences", json=bad)
        assert r.status_code == 400 and needle in r.json()["error"], (bad, r.text)
    assert httpx.get(srv.url + API).json() == {"alerts": []}
    assert httpx.get(srv.url + API, params={"state": "bogus"}).status_code == 400
    assert httpx.post(srv.url + API + "/12345/ack", json={"by": "me"}).status_code == 404
    assert httpx.get(srv.url + API + "/12345").status_code == 404
    st = httpx.get(srv.url + API + "/status").json()
    assert st["control_db"].startswith("sqlite:///") and st["control_db"].endswith(".control.sqlite")
    ev = httpx.post(srv.url + API + "/evaluate").json()
    assert ev["ok"] is True and ev["opened"] == []


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, Any, str]:
    code = tailscope_main(["alerts", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def test_cli_against_a_running_server(make_server: Any, receiver: Receiver, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = make_server()
    monkeypatch.setenv("HOOK_SECRET", "from-env")
    code, out, _ = run_cli(capsys, "--server", srv.url, "webhooks", "add", receiver.url + "/hook", "--secret-env", "HOOK_SECRET", "--format", "slack")
    assert code == 0 and out["webhook"]["format"] == "slack"
    hook_id = out["webhook"]["id"]
    code, out, _ = run_cli(capsys, "--server", srv.url, "webhooks", "update", str(hook_id), "--name", "pager", "--disable")
    assert code == 0 and out["webhook"]["name"] == "pager" and out["webhook"]["enabled"] is False
    code, out, _ = run_cli(capsys, "--server", srv.url, "webhooks", "update", str(hook_id), "--enable")
    assert code == 0 and out["webhook"]["enabled"] is True
    code, out, _ = run_cli(capsys, "--server", srv.url, "webhooks", "test", str(hook_id))
    assert code == 0 and out["ok"] is True
    got = receiver.received[-1]
    assert signing.verify("from-env", got.header(signing.TIMESTAMP_HEADER), got.body, got.header(signing.SIGNATURE_HEADER))
    assert "text" in got.json() and "blocks" in got.json()
    monkeypatch.setenv("TAILSCOPE_SERVER", srv.url)  # the default server for the rest
    code, out, _ = run_cli(capsys, "rules", "add", "--service", "chat-api", "--slo-ms", "800", "--cause", "compile_miss", "--window", "2m", "--webhook", str(hook_id))
    assert code == 0 and out["rule"]["window_s"] == 120 and out["rule"]["causes"] == ["compile_miss"]
    code, out, _ = run_cli(capsys, "rules", "list")
    assert code == 0 and len(out["rules"]) == 1
    code, out, _ = run_cli(capsys, "silence", "--service", "chat-api", "--for", "30m", "--comment", "deploy")
    assert code == 0 and out["silence"]["active"]
    code, out, _ = run_cli(capsys, "silences")
    assert code == 0 and len(out["silences"]) == 1
    code, out, _ = run_cli(capsys, "unsilence", str(out["silences"][0]["id"]))
    assert code == 0
    code, out, _ = run_cli(capsys, "list", "--state", "active")
    assert code == 0 and out == {"alerts": []}
    code, out, _ = run_cli(capsys, "deliveries")
    assert code == 0 and out["deliveries"][0]["event"] == "test"
    code, out, _ = run_cli(capsys, "status")
    assert code == 0 and "evaluations" in out
    code, out, err = run_cli(capsys, "webhooks", "delete", "999")
    assert code == 1 and out is None and "404 no webhook with id 999" in err
    code, out, err = run_cli(capsys, "rules", "add", "--cause", "cosmic_rays")
    assert code == 1 and "unknown cause" in err


def test_cli_reports_an_unreachable_server_in_one_line(capsys: pytest.CaptureFixture) -> None:
    from conftest import free_port

    code, out, err = run_cli(capsys, "--server", f"http://127.0.0.1:{free_port()}", "--timeout", "2", "list")
    assert code == 1 and out is None
    assert "cannot reach the server" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_parse_duration() -> None:
    assert [parse_duration(x) for x in ("90", "90s", "30m", "2h", "1d", "1.5h")] == [90, 90, 1800, 7200, 86400, 5400]
    for bad in ("", "h", "-5m", "0", "5w"):
        with pytest.raises(Exception):
            parse_duration(bad)


def test_alerter_health_on_the_metrics_endpoint(make_server: Any) -> None:
    srv = make_server()
    httpx.post(srv.url + API + "/evaluate")
    text = httpx.get(srv.url + "/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("tailscope_alert"))
    assert lines["tailscope_alerts_active"] == "0"
    assert lines["tailscope_alert_deliveries_pending"] == "0" and lines["tailscope_alert_deliveries_failed"] == "0"
    assert int(lines["tailscope_alert_evaluations"]) >= 1
    assert 0 <= float(lines["tailscope_alert_last_evaluation_age_seconds"]) < 60

"""Message bodies, signatures, URL policy and backoff: the pure parts of alert delivery."""

from __future__ import annotations

import json
import random

import pytest

from analyzer.alerts import formats, signing
from analyzer.alerts.db import default_url, redact_url
from analyzer.alerts.delivery import Sender, WebhookRefused, host_allowed, redact, validate_url
from analyzer.alerts.models import FORMATS
from test_alerts_evaluator import incident

ALERT = {"id": 7, "incident_id": "inc-1", "state": "open", "seq": 1, "top_cause": "compile_miss", "opened_at": "2026-11-23T14:03:00.000Z", "resolved_at": None}
LINK = "https://ts.example/dashboard/incident/inc-1"


def test_every_format_has_a_builder() -> None:
    assert set(formats.BUILDERS) == set(FORMATS)
    with pytest.raises(ValueError, match="unknown webhook format 'teams'"):
        formats.render("teams", ALERT, "open", incident(), LINK)


def test_generic_carries_incident_causes_evidence_and_link() -> None:
    body = json.loads(formats.render("generic", ALERT, "open", incident(), LINK))
    assert body["event"] == "open" and body["url"] == LINK and body["alert"]["id"] == 7
    assert [c["cause"] for c in body["top_causes"]] == ["compile_miss", "queue_saturation"]
    assert body["top_causes"][0]["evidence"] and body["top_causes"][0]["recommendation"] == "fix compile_miss"
    assert "chat-api" in body["summary"] and "3800 ms" in body["summary"] and "62%" in body["summary"]


def test_causes_are_ranked_by_share_and_capped() -> None:
    inc = incident(causes=[("unknown", 0.05), ("kv_eviction", 0.4), ("compile_miss", 0.3), ("gpu_throttle", 0.1), ("cold_start", 0.15)])
    body = json.loads(formats.render("generic", ALERT, "open", inc, LINK))
    assert [c["cause"] for c in body["top_causes"]] == ["kv_eviction", "compile_miss", "cold_start"]
    assert len(body["incident"]["causes"]) == 5  # the full list stays in the incident


def test_slack_message_shape() -> None:
    inc = incident()
    inc["causes"][0]["evidence"] = {"rows": ["x" * 5000]}  # long evidence is cut, not sent whole
    body = json.loads(formats.render("slack", ALERT, "open", inc, LINK))
    assert isinstance(body["text"], str) and "compile_miss" in body["text"]
    types = [b["type"] for b in body["blocks"]]
    assert types[0] == "header" and types[-1] == "context" and types.count("section") >= 3
    assert len(body["blocks"][0]["text"]["text"]) <= 150
    assert all(len(b["text"]["text"]) <= 3000 for b in body["blocks"] if b["type"] == "section" and "text" in b)
    assert LINK in body["blocks"][-1]["elements"][0]["text"]


def test_alertmanager_shape_firing_and_resolved() -> None:
    firing = json.loads(formats.render("alertmanager", ALERT, "open", incident(), LINK))
    assert isinstance(firing, list) and len(firing) == 1
    a = firing[0]
    assert a["labels"]["alertname"] == "TailscopeP99Incident" and a["labels"]["service"] == "chat-api"
    assert all(isinstance(v, str) for v in a["labels"].values()) and all(isinstance(v, str) for v in a["annotations"].values())
    assert a["annotations"]["top_cause"] == "compile_miss" and a["annotations"]["recommendation"] == "fix compile_miss"
    assert a["startsAt"] == ALERT["opened_at"] and "endsAt" not in a and a["generatorURL"] == LINK
    resolved = json.loads(formats.render("alertmanager", {**ALERT, "state": "resolved", "resolved_at": "2026-11-23T14:09:00.000Z"}, "resolved", incident(open=False), LINK))[0]
    assert resolved["endsAt"] == "2026-11-23T14:09:00.000Z"
    assert resolved["labels"] == a["labels"]  # the same alert to Alertmanager: it closes, not a new one


def test_incident_without_causes_still_renders() -> None:
    for fmt in FORMATS:
        json.loads(formats.render(fmt, ALERT, "open", incident(causes=[]), LINK))


def test_link_quotes_the_id() -> None:
    assert formats.incident_link("http://h:1/", "a b&c") == "http://h:1/dashboard/incident/a%20b%26c"


def test_signature_is_hmac_of_timestamp_dot_body() -> None:
    h = signing.sign_headers("k", b'{"a":1}', now=1_700_000_000)
    assert h == {"X-Tailscope-Timestamp": "1700000000", "X-Tailscope-Signature": signing.signature("k", "1700000000", b'{"a":1}')}
    # recomputed with the standard library, independently of signing.signature
    import hashlib
    import hmac

    assert h["X-Tailscope-Signature"] == "sha256=" + hmac.new(b"k", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert signing.verify("k", "1700000000", b'{"a":1}', h["X-Tailscope-Signature"], now=1_700_000_100)
    assert not signing.verify("k", "1700000000", b'{"a":1}', h["X-Tailscope-Signature"], now=1_700_000_400)
    assert not signing.verify("k", "not-a-number", b"", "sha256=00")
    assert signing.sign_headers("", b"x", now=1) == {"X-Tailscope-Timestamp": "1"}


@pytest.mark.parametrize(
    "url, allow, ok",
    [
        ("https://hooks.slack.com/services/x", (), True),
        ("https://hooks.slack.com/services/x", ("hooks.slack.com",), True),
        ("https://HOOKS.slack.com/x", ("hooks.slack.com",), True),
        ("https://evil.example/x", ("hooks.slack.com",), False),
        ("https://a.corp.example/x", ("*.corp.example",), True),
        ("https://corp.example/x", ("*.corp.example",), True),
        ("https://notcorp.example/x", ("*.corp.example",), False),
        ("http://10.0.0.5:9093/api/v2/alerts", ("10.0.0.5:9093",), True),
        ("http://10.0.0.5:9094/api/v2/alerts", ("10.0.0.5:9093",), False),
        ("https://hooks.slack.com.evil.example/x", ("hooks.slack.com",), False),
    ],
)
def test_allow_list(url: str, allow: tuple[str, ...], ok: bool) -> None:
    assert host_allowed(url, allow) is ok
    if not ok:
        with pytest.raises(WebhookRefused):
            validate_url(url, allow)


def test_url_validation_and_redaction() -> None:
    for bad in ("", "hooks.example.com/x", "ftp://h/x", "http://", "http://h:99999/x"):
        with pytest.raises(ValueError):
            validate_url(bad)
    assert redact("https://hooks.slack.com/services/T0/B0/secret?token=abc") == "https://hooks.slack.com/…"
    assert redact("http://127.0.0.1:8080/") == "http://127.0.0.1:8080/"
    assert "pw" not in redact_url("postgresql://u:pw@db:5432/x")
    assert default_url(":memory:") == "sqlite://"
    assert default_url("/data/ts.duckdb") == "sqlite:////data/ts.duckdb.control.sqlite"


def test_backoff_grows_exponentially_with_jitter_and_a_cap(tmp_path) -> None:
    from analyzer.alerts.db import open_engine, session_factory

    sender = Sender(session_factory(open_engine(f"sqlite:///{tmp_path}/c.sqlite")), backoff_base_s=1, backoff_max_s=60, rng=random.Random(3))
    try:
        for attempt in range(1, 12):
            d = min(60, 2 ** (attempt - 1))
            samples = [sender.backoff(attempt) for _ in range(50)]
            assert all(d / 2 <= s <= d for s in samples), (attempt, min(samples), max(samples))
            assert len(set(samples)) > 10  # jittered, not one fixed delay
        assert sender.backoff(1, retry_after_s=30) == 30  # Retry-After wins when longer
        assert sender.backoff(1, retry_after_s=3600) == 60  # but never beyond the cap
    finally:
        sender.close()
    with pytest.raises(ValueError, match="invalid sender settings"):
        Sender(sender.sessions, timeout_s=0)


def test_database_errors_never_carry_parameters(tmp_path) -> None:
    """A failing statement's message (which reaches the server log) must not contain a webhook secret."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from analyzer.alerts.db import open_engine

    engine = open_engine(f"sqlite:///{tmp_path}/c.sqlite")
    try:
        with engine.begin() as con, pytest.raises(SQLAlchemyError) as err:
            con.execute(text("INSERT INTO alert_webhooks (id, url, secret) VALUES (:i, NULL, :s)"), {"i": 1, "s": "very-secret-value"})
        assert "very-secret-value" not in str(err.value)
    finally:
        engine.dispose()

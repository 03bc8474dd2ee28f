"""The evaluator's state machine over a scripted incident source and a real SQLite control DB.

The incident source stands in for the analyzer's in-process API (our own
interface: ``incidents(service, start, end) -> {incidents: [...]}``); the
end-to-end test in test_alerts_e2e.py uses the real analyzer. The clock is
stepped by hand, so hold-downs are checked without sleeping.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from analyzer.alerts.models import Delivery
from analyzer.alerts.service import AlertService
from tailscope.config import load

T0 = dt.datetime(2026, 11, 23, 14, 0, 0)


class ScriptedIncidents:
    """Returns whatever incidents the test put in ``items``; records the queried ranges."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.calls: list[tuple[Any, Any]] = []

    def incidents(self, service: str | None = None, start: Any = None, end: Any = None) -> dict[str, Any]:
        self.calls.append((start, end))
        return {"incidents": copy.deepcopy(self.items)}


def incident(iid: str = "inc-1", service: str = "chat-api", *, open: bool = True, causes: list[tuple[str, float]] | None = None, p99: float = 3800.0, base: float = 400.0, requests: int = 600, minutes: int = 3) -> dict[str, Any]:
    causes = causes if causes is not None else [("compile_miss", 0.62), ("queue_saturation", 0.2)]
    return {
        "id": iid,
        "service": service,
        "start": (T0).isoformat() + "Z",
        "end": (T0 + dt.timedelta(minutes=minutes)).isoformat() + "Z",
        "p99_ms": p99,
        "baseline_p99_ms": base,
        "requests": requests,
        "slow_requests": 40,
        "open": open,
        "causes": [
            {"cause": c, "share": sh, "excess_ms": 1000 * sh, "evidence": {"spans": [f"{c}-evidence"]}, "recommendation": f"fix {c}"}
            for c, sh in causes
        ],
    }


class Harness:
    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        settings.setdefault("db", str(tmp_path / "store.duckdb"))
        settings.setdefault("alert_hold_down_s", 120)
        settings.setdefault("public_url", "https://tailscope.example")
        self.source = ScriptedIncidents()
        self.service = AlertService(load(settings, environ={}), self.source)
        self.now = T0 + dt.timedelta(minutes=3)
        self.service.evaluator.clock = lambda: self.now

    def step(self, seconds: float = 10) -> dict[str, Any]:
        self.now += dt.timedelta(seconds=seconds)
        return self.service.evaluate_now()

    def deliveries(self) -> list[Delivery]:
        with self.service.sessions() as s:
            return list(s.scalars(select(Delivery).order_by(Delivery.id)))

    def close(self) -> None:
        self.service.stop()


@pytest.fixture
def h(tmp_path: Path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def test_default_rule_sends_every_open_incident_to_every_webhook_once(h: Harness) -> None:
    a = h.service.add_webhook("http://127.0.0.1:9/a", "s1")
    b = h.service.add_webhook("http://127.0.0.1:9/b", "", "slack")
    h.source.items = [incident()]
    r = h.step()
    assert len(r["opened"]) == 1 and r["enqueued"] == 2
    for _ in range(3):
        assert h.step()["enqueued"] == 0  # the same open incident is not news again
    ds = h.deliveries()
    assert sorted(d.webhook_id for d in ds) == sorted([a["id"], b["id"]])
    assert {d.event for d in ds} == {"open"}
    assert len({d.idempotency_key for d in ds}) == 1  # one key per alert+state
    generic = json.loads(next(d.body for d in ds if d.webhook_id == a["id"]))
    assert generic["event"] == "open"
    assert generic["top_causes"][0]["cause"] == "compile_miss"
    assert generic["top_causes"][0]["recommendation"] == "fix compile_miss"
    assert generic["top_causes"][0]["evidence"] == {"spans": ["compile_miss-evidence"]}
    assert generic["url"] == "https://tailscope.example/dashboard/incident/inc-1"
    assert generic["alert"]["state"] == "open"
    slack = json.loads(next(d.body for d in ds if d.webhook_id == b["id"]))
    assert "compile_miss" in slack["text"] and slack["blocks"]
    alerts = h.service.list_alerts()
    assert len(alerts) == 1 and alerts[0]["top_cause"] == "compile_miss" and alerts[0]["state"] == "open"


def test_query_ends_at_now_for_the_freshest_data(h: Harness) -> None:
    h.step()
    start, end = h.source.calls[-1]
    assert end.replace(tzinfo=None) == h.now
    assert (end - start).total_seconds() >= 3600


def test_closed_incident_never_seen_open_is_history_not_news(h: Harness) -> None:
    h.service.add_webhook("http://127.0.0.1:9/a")
    h.source.items = [incident(open=False)]
    assert h.step()["opened"] == []
    assert h.deliveries() == []


def test_top_cause_change_updates_only_when_it_persists(h: Harness) -> None:
    h.service.add_webhook("http://127.0.0.1:9/a")
    h.source.items = [incident()]
    h.step()
    h.source.items = [incident(causes=[("kv_eviction", 0.5), ("compile_miss", 0.4)])]
    assert h.step()["updated"] == []  # seen once: could be noise
    h.source.items = [incident()]
    assert h.step()["updated"] == []  # flipped back: nothing sent
    h.source.items = [incident(causes=[("kv_eviction", 0.5), ("compile_miss", 0.4)])]
    h.step()
    r = h.step()
    assert len(r["updated"]) == 1
    ds = h.deliveries()
    assert [d.event for d in ds] == ["open", "updated"]
    body = json.loads(ds[-1].body)
    assert body["event"] == "updated" and body["top_causes"][0]["cause"] == "kv_eviction"
    assert ds[0].idempotency_key != ds[1].idempotency_key
    assert h.service.list_alerts()[0]["top_cause"] == "kv_eviction"


def test_resolve_waits_for_the_hold_down_and_a_dip_does_not_flap(h: Harness) -> None:
    h.service.add_webhook("http://127.0.0.1:9/a")
    h.source.items = [incident()]
    h.step()
    h.source.items = [incident(open=False)]
    for _ in range(5):  # 50 s closed, hold-down is 120 s
        assert h.step()["resolved"] == []
    h.source.items = [incident()]  # spiky again: the same alert carries on
    assert h.step() == {"incidents": 1, "opened": [], "updated": [], "resolved": [], "reopened": [], "enqueued": 0}
    h.source.items = [incident(open=False, p99=450)]
    resolved_at = None
    for _ in range(20):
        r = h.step()
        if r["resolved"]:
            resolved_at = h.now
            break
    assert resolved_at is not None
    ds = h.deliveries()
    assert [d.event for d in ds] == ["open", "resolved"]
    body = json.loads(ds[-1].body)
    assert body["event"] == "resolved" and body["incident"]["open"] is False
    assert h.step()["resolved"] == []  # resolved once
    # the same incident spiking again re-opens the same alert
    h.source.items = [incident()]
    r = h.step()
    assert r["reopened"] and not r["opened"]
    assert [d.event for d in h.deliveries()] == ["open", "resolved", "open"]
    assert len(h.service.list_alerts()) == 1


def test_vanished_incident_resolves_after_hold_down(h: Harness) -> None:
    h.service.add_webhook("http://127.0.0.1:9/a")
    h.source.items = [incident()]
    h.step()
    h.source.items = []
    assert h.step(60)["resolved"] == []
    assert len(h.step(70)["resolved"]) == 1


def test_changed_incident_id_is_adopted_not_a_second_alert(h: Harness) -> None:
    h.service.add_webhook("http://127.0.0.1:9/a")
    h.source.items = [incident("inc-1")]
    h.step()
    grown = incident("inc-1b", minutes=5)
    h.source.items = [grown]
    r = h.step()
    assert r["opened"] == []
    alerts = h.service.list_alerts()
    assert len(alerts) == 1 and alerts[0]["incident_id"] == "inc-1b"
    assert len(h.deliveries()) == 1


def test_rules_filter_and_route(h: Harness) -> None:
    a = h.service.add_webhook("http://127.0.0.1:9/a")
    b = h.service.add_webhook("http://127.0.0.1:9/b")
    h.service.add_rule(service="chat-api", slo_ms=1000, causes=["compile_miss"], webhook_ids=[b["id"]], min_requests=100, window_s=120)
    h.source.items = [
        incident("i-other", service="embed"),  # other service
        incident("i-under-slo", p99=900),  # under the SLO
        incident("i-kv", causes=[("kv_eviction", 0.9)]),  # cause filtered out
        incident("i-few", requests=50),  # too few requests
        incident("i-short", minutes=1),  # not lasted the window yet
        incident("i-match"),
    ]
    r = h.step()
    assert len(r["opened"]) == 1
    alerts = h.service.list_alerts()
    assert [x["incident_id"] for x in alerts] == ["i-match"]
    assert [d.webhook_id for d in h.deliveries()] == [b["id"]]
    assert a["id"] != b["id"]


def test_spike_factor_rule(h: Harness) -> None:
    h.service.add_webhook("http://127.0.0.1:9/a")
    h.service.add_rule(spike_factor=5)
    h.source.items = [incident("i-small", p99=1500, base=400), incident("i-big", p99=2100, base=400)]
    h.step()
    assert [x["incident_id"] for x in h.service.list_alerts()] == ["i-big"]


def test_silence_holds_back_then_catches_up(h: Harness) -> None:
    h.service.add_webhook("http://127.0.0.1:9/a")
    sil = h.service.add_silence(service="chat-api", cause=None, duration_s=3600)
    # silences are wall-clock based; the harness clock is in the past, so move the silence onto it
    with h.service.sessions() as s:
        from analyzer.alerts.models import Silence

        row = s.get(Silence, sil["id"])
        row.starts_at, row.ends_at = h.now - dt.timedelta(minutes=1), h.now + dt.timedelta(seconds=30)
        s.commit()
    h.source.items = [incident()]
    r = h.step()
    assert len(r["opened"]) == 1 and r["enqueued"] == 0
    assert h.service.list_alerts()[0]["silenced"] is True
    h.step(10)
    assert h.deliveries() == []
    h.step(30)  # silence over, incident still open: now it is sent, as "open"
    ds = h.deliveries()
    assert [d.event for d in ds] == ["open"]
    assert h.service.list_alerts()[0]["silenced"] is False


def test_acknowledged_alert_sends_no_updates_but_sends_resolution(h: Harness) -> None:
    h.service.add_webhook("http://127.0.0.1:9/a")
    h.source.items = [incident()]
    h.step()
    alert_id = h.service.list_alerts()[0]["id"]
    acked = h.service.acknowledge(alert_id, by="alice", comment="on it")
    assert acked["acknowledged"] and acked["acknowledged_by"] == "alice"
    h.source.items = [incident(causes=[("kv_eviction", 0.9)])]
    h.step()
    assert len(h.step()["updated"]) == 1
    h.source.items = [incident(open=False)]
    h.step(10)
    h.step(130)
    assert [d.event for d in h.deliveries()] == ["open", "resolved"]


def test_no_webhook_no_delivery_but_alert_tracked(h: Harness) -> None:
    h.source.items = [incident()]
    r = h.step()
    assert len(r["opened"]) == 1 and r["enqueued"] == 0
    assert h.deliveries() == []


def test_analyzer_failure_is_counted_and_the_loop_survives(tmp_path: Path) -> None:
    class Broken:
        def incidents(self, **_: Any) -> dict[str, Any]:
            raise RuntimeError("store is busy")

    service = AlertService(load({"db": str(tmp_path / "x.duckdb"), "alert_interval_s": 1}, environ={}), Broken())
    try:
        service.evaluator.interval_s = 0.05
        service.start()
        deadline = dt.datetime.now() + dt.timedelta(seconds=10)
        while service.evaluator.errors < 2 and dt.datetime.now() < deadline:
            service.evaluator._stop.wait(0.05)
        st = service.status()
        assert st["evaluation_errors"] >= 2 and "store is busy" in st["last_error"]
    finally:
        service.stop()


def test_prune_drops_old_resolved_alerts_but_keeps_active_and_pending(h: Harness) -> None:
    h.service.add_webhook("http://127.0.0.1:9/a")
    h.source.items = [incident("old"), incident("busy", service="b"), incident("active", service="c")]
    h.step()
    h.source.items = [incident("old", open=False), incident("busy", service="b", open=False), incident("active", service="c")]
    h.step(10)
    h.step(130)
    with h.service.sessions() as s:  # "old"'s deliveries went out; "busy" still has a pending one
        for d in s.scalars(select(Delivery)):
            if json.loads(d.body)["incident"]["id"] == "old":
                d.status = "delivered"
        s.commit()
    states = {a["incident_id"]: a["state"] for a in h.service.list_alerts()}
    assert states == {"old": "resolved", "busy": "resolved", "active": "open"}
    out = h.service.evaluator.prune(h.now + dt.timedelta(seconds=1))
    assert out["alerts"] == 1 and out["deliveries"] == 2
    assert {a["incident_id"] for a in h.service.list_alerts()} == {"busy", "active"}
    assert h.service.evaluator.prune(h.now - dt.timedelta(days=1)) == {"alerts": 0, "deliveries": 0}

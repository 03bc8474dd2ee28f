"""The alerting part of the server: control database, evaluator, sender, and the operations the API exposes.

``AlertService(config, analyzer)`` is what ``tailscope/server.py`` wires in as
``server.parts["alerts"]``; the server calls ``start()``/``stop()``. The
operations below are plain methods so the HTTP router stays a thin layer and
tests can drive them directly.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from analyzer.alerts import formats
from analyzer.alerts.db import default_url, open_engine, redact_url, session_factory
from analyzer.alerts.delivery import Sender, WebhookRefused, redact, validate_url
from analyzer.alerts.evaluator import Evaluator, IncidentSource
from analyzer.alerts.models import ALERT_STATES, DELIVERY_STATUSES, FORMATS, Alert, Delivery, Rule, Silence, Webhook, rfc3339, utcnow
from tailscope.causes import CAUSES  # rules and silences may name only these
from tailscope.errors import BadRequest, NotFound

log = logging.getLogger("tailscope.alerts")


def webhook_view(hook: Webhook) -> dict[str, Any]:
    """A webhook as the API shows it: the secret never, the URL without anything after the host."""
    return {
        "id": hook.id,
        "name": hook.name,
        "url": redact(hook.url),
        "format": hook.format,
        "has_secret": bool(hook.secret),
        "enabled": hook.enabled,
        "created_at": rfc3339(hook.created_at),
    }


class AlertService:
    """Alert rules, webhooks, silences, the evaluator and the outbox sender.

    Args:
        config: resolved settings (``control_db``, ``alert_interval_s``,
            ``alert_hold_down_s``, ``webhook_allow_hosts``, ``public_url``, ``db``,
            ``host``, ``port``).
        analyzer: the in-process analyzer (``incidents(service, start, end)``);
            ``None`` keeps the API working with nothing to evaluate.
        sender_options: overrides for :class:`Sender` (timeouts, backoff) — tests and benchmarks.
    """

    def __init__(self, config: Any, analyzer: IncidentSource | None, *, sender_options: dict[str, Any] | None = None) -> None:
        self.config = config
        self.url = config.control_db or default_url(config.db)
        self.engine = open_engine(self.url)
        self.sessions = session_factory(self.engine)
        self.allow_hosts = tuple(config.webhook_allow_hosts or ())
        self._seen_base_url: str | None = None
        self.sender = Sender(self.sessions, allow_hosts=self.allow_hosts, **(sender_options or {}))
        hold = float(config.alert_hold_down_s)
        self.evaluator = Evaluator(
            analyzer,
            self.sessions,
            interval_s=float(config.alert_interval_s),
            hold_down_s=hold,
            lookback_s=max(3600.0, 4 * hold),
            base_url=self.base_url,
            on_enqueue=self.sender.wake,
            # alerts outlive their telemetry no longer than --retention-hours (and never less than a day)
            keep_s=max(86400.0, 3600.0 * config.retention_hours) if config.retention_hours else None,
        )
        self._started = False
        log.info("alerts: control database %s", redact_url(self.url))

    # --- lifecycle --------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        self.sender.start()
        self.evaluator.start()
        self._started = True

    def stop(self) -> None:
        """Evaluator first (no new rows), then the sender (in-flight sends finish)."""
        self.evaluator.stop()
        self.sender.close()
        self._started = False
        self.engine.dispose()

    # --- links ------------------------------------------------------------
    def note_base_url(self, url: str) -> None:
        """Remember the URL the API was reached at (used for links when the port was 0)."""
        if self._seen_base_url is None:
            self._seen_base_url = url.rstrip("/")

    def base_url(self) -> str:
        """``--public-url``, else ``http://HOST:PORT`` (else the URL the API was reached at)."""
        if self.config.public_url:
            return str(self.config.public_url).rstrip("/")
        if not self.config.port and self._seen_base_url:
            return self._seen_base_url
        host = self.config.host
        if host in ("", "0.0.0.0", "::"):
            host = socket.getfqdn()
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.config.port}"

    # --- webhooks ---------------------------------------------------------
    def add_webhook(self, url: str, secret: str = "", fmt: str = "generic", name: str = "", enabled: bool = True) -> dict[str, Any]:
        if fmt not in FORMATS:
            raise BadRequest(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
        try:
            url = validate_url(url, self.allow_hosts)
        except (ValueError, WebhookRefused) as exc:
            raise BadRequest(f"url: {exc}") from None
        with self.sessions() as s:
            hook = Webhook(url=url, secret=secret or "", format=fmt, name=name or "", enabled=enabled)
            s.add(hook)
            s.commit()
            log.info("alerts: webhook %s added (%s, %s)", hook.id, fmt, redact(url))
            return webhook_view(hook)

    def list_webhooks(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            return [webhook_view(h) for h in s.scalars(select(Webhook).order_by(Webhook.id))]

    def get_webhook(self, webhook_id: int) -> dict[str, Any]:
        with self.sessions() as s:
            return webhook_view(self._hook(s, webhook_id))

    def update_webhook(self, webhook_id: int, **changes: Any) -> dict[str, Any]:
        """Change some of url, secret (rotation), format, name, enabled; unchanged fields stay.

        Pending deliveries keep their stored body (rendered in the old format)
        but are signed with the new secret and sent to the new URL.
        """
        with self.sessions() as s:
            hook = self._hook(s, webhook_id)
            if changes.get("format") is not None:
                if changes["format"] not in FORMATS:
                    raise BadRequest(f"format: {changes['format']!r} is not one of {', '.join(FORMATS)}")
                hook.format = changes["format"]
            if changes.get("url") is not None:
                try:
                    hook.url = validate_url(changes["url"], self.allow_hosts)
                except (ValueError, WebhookRefused) as exc:
                    raise BadRequest(f"url: {exc}") from None
            if changes.get("secret") is not None:
                hook.secret = changes["secret"]
            if changes.get("name") is not None:
                hook.name = changes["name"]
            if changes.get("enabled") is not None:
                hook.enabled = bool(changes["enabled"])
            s.commit()
            log.info("alerts: webhook %s updated (%s)", hook.id, ", ".join(sorted(k for k, v in changes.items() if v is not None)) or "nothing")
            return webhook_view(hook)

    def delete_webhook(self, webhook_id: int) -> dict[str, Any]:
        """Delete it and cancel what was still waiting to go to it."""
        with self.sessions() as s:
            hook = self._hook(s, webhook_id)
            s.execute(
                update(Delivery)
                .where(Delivery.webhook_id == webhook_id, Delivery.status == "pending")
                .values(status="cancelled", last_error="webhook deleted", lease_until=None)
            )
            s.delete(hook)
            s.commit()
        return {"ok": True, "deleted": webhook_id}

    def test_webhook(self, webhook_id: int) -> dict[str, Any]:
        """Send a sample alert to one webhook now (one attempt) and log it as a delivery."""
        now = utcnow()
        with self.sessions() as s:
            hook = self._hook(s, webhook_id)
            url, secret, fmt = hook.url, hook.secret, hook.format
        incident = sample_incident(now)
        alert = {"id": 0, "state": "open", "seq": 0, "top_cause": "compile_miss", "opened_at": rfc3339(now), "test": True}
        body = formats.render(fmt, alert, "open", incident, formats.incident_link(self.base_url(), incident["id"]))
        key = f"tailscope-test-{webhook_id}-{int(now.timestamp() * 1000)}"
        result = self.sender.send(url, secret, body.encode("utf-8"), event="test", idempotency_key=key)
        with self.sessions() as s:
            d = Delivery(
                alert_id=None,
                webhook_id=webhook_id,
                seq=0,
                event="test",
                idempotency_key=key,
                body=body,
                status="delivered" if result.ok else "failed",
                attempts=1,
                next_attempt_at=now,
                last_status_code=result.status_code,
                last_error=result.error,
                created_at=now,
                delivered_at=utcnow() if result.ok else None,
            )
            s.add(d)
            s.commit()
            return {"ok": result.ok, "status_code": result.status_code, "error": result.error, "delivery": d.to_dict()}

    @staticmethod
    def _hook(s: Session, webhook_id: int) -> Webhook:
        hook = s.get(Webhook, webhook_id)
        if hook is None:
            raise NotFound(f"no webhook with id {webhook_id}")
        return hook

    # --- rules ------------------------------------------------------------
    def _check_rule(self, s: Session, fields: dict[str, Any]) -> dict[str, Any]:
        out = dict(fields)
        for name in ("slo_ms", "spike_factor"):
            v = out.get(name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise BadRequest(f"{name}: must be a number > 0, got {v!r}")
        if out.get("spike_factor") is not None and out["spike_factor"] < 1:
            raise BadRequest(f"spike_factor: must be >= 1 (p99 over baseline), got {out['spike_factor']!r}")
        if (out.get("window_s") or 0) < 0:
            raise BadRequest(f"window_s: must be >= 0, got {out['window_s']!r}")
        if (out.get("min_requests") or 0) < 0:
            raise BadRequest(f"min_requests: must be >= 0, got {out['min_requests']!r}")
        bad = [c for c in out.get("causes") or [] if c not in CAUSES]
        if bad:
            raise BadRequest(f"causes: unknown cause(s) {', '.join(map(repr, bad))}; known: {', '.join(CAUSES)}")
        for wid in out.get("webhook_ids") or []:
            if s.get(Webhook, wid) is None:
                raise BadRequest(f"webhook_ids: no webhook with id {wid}")
        return out

    def add_rule(self, **fields: Any) -> dict[str, Any]:
        with self.sessions() as s:
            f = self._check_rule(s, fields)
            rule = Rule()
            _apply_rule(rule, f)
            s.add(rule)
            s.commit()
            return rule.to_dict()

    def replace_rule(self, rule_id: int, **fields: Any) -> dict[str, Any]:
        with self.sessions() as s:
            rule = self._rule(s, rule_id)
            f = self._check_rule(s, fields)
            _apply_rule(rule, f)
            s.commit()
            return rule.to_dict()

    def list_rules(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            return [r.to_dict() for r in s.scalars(select(Rule).order_by(Rule.id))]

    def get_rule(self, rule_id: int) -> dict[str, Any]:
        with self.sessions() as s:
            return self._rule(s, rule_id).to_dict()

    def delete_rule(self, rule_id: int) -> dict[str, Any]:
        with self.sessions() as s:
            s.delete(self._rule(s, rule_id))
            s.commit()
        return {"ok": True, "deleted": rule_id}

    @staticmethod
    def _rule(s: Session, rule_id: int) -> Rule:
        rule = s.get(Rule, rule_id)
        if rule is None:
            raise NotFound(f"no rule with id {rule_id}")
        return rule

    # --- silences ---------------------------------------------------------
    def add_silence(self, *, service: str | None, cause: str | None, duration_s: float | None = None, ends_at: dt.datetime | None = None, comment: str = "", created_by: str = "") -> dict[str, Any]:
        now = utcnow()
        if cause and cause not in CAUSES:
            raise BadRequest(f"cause: unknown cause {cause!r}; known: {', '.join(CAUSES)}")
        if ends_at is None:
            if duration_s is None or duration_s <= 0:
                raise BadRequest("a silence needs duration_s > 0 or ends_at in the future")
            ends_at = now + dt.timedelta(seconds=duration_s)
        if ends_at <= now:
            raise BadRequest(f"ends_at: {rfc3339(ends_at)} is not in the future")
        with self.sessions() as s:
            sil = Silence(service=service or None, cause=cause or None, starts_at=now, ends_at=ends_at, comment=comment, created_by=created_by, created_at=now)
            s.add(sil)
            s.commit()
            return sil.to_dict(now)

    def list_silences(self, include_expired: bool = False) -> list[dict[str, Any]]:
        now = utcnow()
        with self.sessions() as s:
            q = select(Silence).order_by(Silence.id)
            if not include_expired:
                q = q.where(Silence.ends_at > now)
            return [x.to_dict(now) for x in s.scalars(q)]

    def expire_silence(self, silence_id: int) -> dict[str, Any]:
        now = utcnow()
        with self.sessions() as s:
            sil = s.get(Silence, silence_id)
            if sil is None:
                raise NotFound(f"no silence with id {silence_id}")
            if sil.ends_at > now:
                sil.ends_at = now
            s.commit()
            return sil.to_dict(now)

    # --- alerts and deliveries -------------------------------------------
    def list_alerts(self, state: str | None = None, service: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if state and state not in ALERT_STATES and state != "active":
            raise BadRequest(f"state: {state!r} is not one of active, {', '.join(ALERT_STATES)}")
        with self.sessions() as s:
            q = select(Alert).order_by(Alert.id.desc()).limit(max(1, min(limit, 1000)))
            if state == "active":
                q = q.where(Alert.state != "resolved")
            elif state:
                q = q.where(Alert.state == state)
            if service:
                q = q.where(Alert.service == service)
            return [a.to_dict() for a in s.scalars(q)]

    def get_alert(self, alert_id: int) -> dict[str, Any]:
        with self.sessions() as s:
            alert = s.get(Alert, alert_id)
            if alert is None:
                raise NotFound(f"no alert with id {alert_id}")
            out = alert.to_dict()
            out["deliveries"] = [d.to_dict() for d in s.scalars(select(Delivery).where(Delivery.alert_id == alert_id).order_by(Delivery.id))]
            return out

    def acknowledge(self, alert_id: int, by: str = "", comment: str = "") -> dict[str, Any]:
        """Mark an alert as being handled: cause updates stop paging; the resolution still goes out."""
        with self.sessions() as s:
            alert = s.get(Alert, alert_id)
            if alert is None:
                raise NotFound(f"no alert with id {alert_id}")
            alert.acknowledged_at, alert.acknowledged_by, alert.ack_comment = utcnow(), by or None, comment or None
            s.commit()
            return alert.to_dict()

    def list_deliveries(self, alert_id: int | None = None, status: str | None = None, webhook_id: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if status and status not in DELIVERY_STATUSES:
            raise BadRequest(f"status: {status!r} is not one of {', '.join(DELIVERY_STATUSES)}")
        with self.sessions() as s:
            q = select(Delivery).order_by(Delivery.id.desc()).limit(max(1, min(limit, 1000)))
            if alert_id is not None:
                q = q.where(Delivery.alert_id == alert_id)
            if status:
                q = q.where(Delivery.status == status)
            if webhook_id is not None:
                q = q.where(Delivery.webhook_id == webhook_id)
            return [d.to_dict() for d in s.scalars(q)]

    def status(self) -> dict[str, Any]:
        with self.sessions() as s:
            counts = dict(s.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all())
            active = s.scalar(select(func.count()).select_from(Alert).where(Alert.state != "resolved"))
        ev = self.evaluator
        return {
            "control_db": redact_url(self.url),
            "analyzer": ev.analyzer is not None,
            "interval_s": ev.interval_s,
            "hold_down_s": ev.hold_down.total_seconds(),
            "evaluations": ev.evaluations,
            "evaluation_errors": ev.errors,
            "last_evaluated_at": rfc3339(ev.last_evaluated_at),
            "last_error": ev.last_error,
            "active_alerts": int(active or 0),
            "deliveries": {k: int(counts.get(k, 0)) for k in DELIVERY_STATUSES},
        }

    def register_metrics(self, metrics: Any) -> None:
        """Expose the alerter's health on ``/metrics`` (``metrics.gauge(name, help, read)``), read at scrape time.

        Who alerts on the alerter: a growing ``pending`` or a stale last
        evaluation means pages are not going out.
        """

        def count(q: Any) -> float:
            with self.sessions() as s:
                return float(s.scalar(q) or 0)

        def age() -> float:
            last = self.evaluator.last_evaluated_at
            if last is None:
                raise LookupError("no evaluation yet")
            return (utcnow() - last).total_seconds()

        metrics.gauge("tailscope_alerts_active", "Alerts open or updated (not resolved).",
                      lambda: count(select(func.count()).select_from(Alert).where(Alert.state != "resolved")))
        for status in ("pending", "failed"):
            metrics.gauge(f"tailscope_alert_deliveries_{status}", f"Outbox rows with status {status}.",
                          lambda status=status: count(select(func.count()).select_from(Delivery).where(Delivery.status == status)))
        metrics.gauge("tailscope_alert_evaluations", "Alert evaluations completed since start.", lambda: float(self.evaluator.evaluations))
        metrics.gauge("tailscope_alert_evaluation_errors", "Alert evaluations that failed since start.", lambda: float(self.evaluator.errors))
        metrics.gauge("tailscope_alert_last_evaluation_age_seconds", "Seconds since the last completed alert evaluation.", age)

    def evaluate_now(self) -> dict[str, Any]:
        return self.evaluator.evaluate().to_dict()


def _apply_rule(rule: Rule, f: dict[str, Any]) -> None:
    rule.name = f.get("name") or ""
    rule.service = f.get("service") or None
    rule.slo_ms = f.get("slo_ms")
    rule.spike_factor = f.get("spike_factor")
    rule.window_s = float(f.get("window_s") or 0)
    rule.min_requests = int(f.get("min_requests") or 0)
    rule.causes_json = json.dumps(list(f.get("causes") or []))
    rule.webhook_ids_json = json.dumps([int(i) for i in f.get("webhook_ids") or []])
    rule.enabled = bool(f.get("enabled", True))


def sample_incident(now: dt.datetime) -> dict[str, Any]:
    """What a test-send carries: a made-up incident, clearly labelled as a test."""
    start = now - dt.timedelta(minutes=5)
    return {
        "id": "test-incident",
        "service": "tailscope-test",
        "start": rfc3339(start),
        "end": rfc3339(now),
        "p99_ms": 3800.0,
        "baseline_p99_ms": 420.0,
        "requests": 1200,
        "slow_requests": 74,
        "open": True,
        "test": True,
        "causes": [
            {
                "cause": "compile_miss",
                "share": 0.62,
                "excess_ms": 3400.0,
                "evidence": {"note": "test message from tailscope: no real incident"},
                "recommendation": "This is a test alert; nothing to do.",
            }
        ],
    }



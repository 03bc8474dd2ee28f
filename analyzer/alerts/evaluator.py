"""Turning the analyzer's incidents into alerts, without flapping.

Every ``alert_interval_s`` the evaluator asks the analyzer for the incidents
of the last hour up to *now* and moves each incident's alert through
``open → updated … → resolved``:

- **open** when an open incident matches a rule (no rule configured: the
  default rule matches every incident and sends to every webhook);
- **updated** when the top cause changes and the new one is seen on two
  evaluations in a row (a cause that wins once by a hair is not news);
- **resolved** when the incident has stopped being open for
  ``hold_down_s`` (a p99 that dips for one window does not resolve and
  re-open the alert); an incident that opens again after its alert resolved
  re-opens the same alert.

One alert per incident (a unique key on the incident id). Should the
analyzer's incident id change as the incident grows, an unresolved alert of
the same service whose incident overlaps the new one adopts the new id
instead of a second alert being opened. Each notified transition writes its
outbox rows in the same transaction as the alert row, so a crash right after
cannot lose the notification and a restart does not repeat it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from sqlalchemy import delete, false, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from analyzer.alerts import formats
from analyzer.alerts.models import Alert, Delivery, Rule, Silence, Webhook, utcnow

log = logging.getLogger("tailscope.alerts.evaluator")

PRUNE_EVERY_S = 3600.0
"""How often old resolved alerts are pruned (when a retention is set)."""


class IncidentSource(Protocol):
    """What the evaluator needs of the analyzer (``analyzer.service.Analyzer``)."""

    def incidents(self, service: str | None = None, start: Any = None, end: Any = None) -> dict[str, Any]: ...


def parse_time(value: Any) -> dt.datetime | None:
    """RFC 3339 / datetime / unix seconds → naive UTC (None when absent or unreadable)."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None) if value.tzinfo else value
    if isinstance(value, (int, float)):
        return dt.datetime(1970, 1, 1) + dt.timedelta(seconds=float(value))
    text = str(value).strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed.astimezone(dt.timezone.utc).replace(tzinfo=None) if parsed.tzinfo else parsed


def top_cause(incident: dict[str, Any]) -> str | None:
    causes = formats.top_causes(incident)
    return str(causes[0].get("cause")) if causes else None


def rule_matches(rule: Rule, incident: dict[str, Any]) -> bool:
    """Every condition the rule sets must hold (unset conditions hold)."""
    if rule.service and rule.service != incident.get("service"):
        return False
    p99 = float(incident.get("p99_ms") or 0.0)
    if rule.slo_ms is not None and p99 < rule.slo_ms:
        return False
    if rule.spike_factor is not None:
        base = float(incident.get("baseline_p99_ms") or 0.0)
        if base <= 0 or p99 < rule.spike_factor * base:
            return False
    if rule.min_requests and int(incident.get("requests") or 0) < rule.min_requests:
        return False
    if rule.window_s:
        start, end = parse_time(incident.get("start")), parse_time(incident.get("end"))
        if start is None or end is None or (end - start).total_seconds() < rule.window_s:
            return False
    causes = rule.causes
    if causes and top_cause(incident) not in causes:
        return False
    return True


@dataclass
class EvalResult:
    """What one evaluation did (returned by ``POST /api/v1/alerts/evaluate``)."""

    incidents: int = 0
    opened: list[int] = field(default_factory=list)
    updated: list[int] = field(default_factory=list)
    resolved: list[int] = field(default_factory=list)
    reopened: list[int] = field(default_factory=list)
    enqueued: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "incidents": self.incidents,
            "opened": self.opened,
            "updated": self.updated,
            "resolved": self.resolved,
            "reopened": self.reopened,
            "enqueued": self.enqueued,
        }


class Evaluator:
    """The periodic alert evaluation.

    Args:
        analyzer: anything with ``incidents(service, start, end)`` (the real analyzer in the server).
        sessions: control-plane session factory.
        interval_s: seconds between evaluations.
        hold_down_s: how long an incident must stay closed before its alert resolves.
        base_url: returns the dashboard base URL for links (called at notification time).
        lookback_s: how far back incidents are fetched; must exceed ``hold_down_s``.
        on_enqueue: called after outbox rows were committed (wakes the sender).
        keep_s: resolved alerts older than this are pruned hourly (None: kept forever).
    """

    def __init__(
        self,
        analyzer: IncidentSource | None,
        sessions: sessionmaker[Session],
        *,
        interval_s: float,
        hold_down_s: float,
        base_url: Callable[[], str],
        lookback_s: float = 3600.0,
        on_enqueue: Callable[[], None] = lambda: None,
        clock: Callable[[], dt.datetime] = utcnow,
        keep_s: float | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"alert interval must be > 0 s, got {interval_s}")
        if hold_down_s < 0:
            raise ValueError(f"alert hold-down must be >= 0 s, got {hold_down_s}")
        if lookback_s <= hold_down_s:
            raise ValueError(f"lookback_s ({lookback_s}) must exceed hold_down_s ({hold_down_s})")
        self.analyzer = analyzer
        self.sessions = sessions
        self.interval_s = interval_s
        self.hold_down = dt.timedelta(seconds=hold_down_s)
        self.lookback = dt.timedelta(seconds=lookback_s)
        self.base_url = base_url
        self.on_enqueue = on_enqueue
        self.clock = clock
        self.keep = dt.timedelta(seconds=keep_s) if keep_s else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one evaluation at a time (timer vs. POST /evaluate)
        self.evaluations = 0
        self.errors = 0
        self.last_evaluated_at: dt.datetime | None = None
        self.last_error: str | None = None

    # --- lifecycle --------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="tailscope-alert-evaluator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None

    def _loop(self) -> None:
        last_prune = 0.0
        while not self._stop.is_set():
            try:
                self.evaluate()
            except Exception as exc:  # keep evaluating; the next round may succeed
                self.errors += 1
                self.last_error = f"{exc.__class__.__name__}: {exc}"
                log.exception("alert evaluation failed")
            if self.keep is not None and time.monotonic() - last_prune >= PRUNE_EVERY_S:
                last_prune = time.monotonic()
                try:
                    self.prune(self.clock() - self.keep)
                except Exception:
                    log.exception("pruning old alerts failed")
            self._stop.wait(self.interval_s)

    def prune(self, before: dt.datetime) -> dict[str, int]:
        """Delete alerts resolved before ``before`` (with their deliveries) and old test-sends.

        Alerts with a delivery still pending are kept, whatever their age.
        """
        with self._lock, self.sessions() as s:
            busy = select(Delivery.alert_id).where(Delivery.status == "pending", Delivery.alert_id.is_not(None))
            old = select(Alert.id).where(Alert.state == "resolved", Alert.resolved_at < before, Alert.id.not_in(busy))
            ids = list(s.scalars(old))
            n_del = 0
            if ids:
                n_del += s.execute(delete(Delivery).where(Delivery.alert_id.in_(ids))).rowcount or 0
                s.execute(delete(Alert).where(Alert.id.in_(ids)))
            n_del += s.execute(delete(Delivery).where(Delivery.alert_id.is_(None), Delivery.created_at < before)).rowcount or 0
            s.commit()
        return {"alerts": len(ids), "deliveries": n_del}

    # --- one evaluation ---------------------------------------------------
    def fetch_incidents(self, now: dt.datetime) -> list[dict[str, Any]]:
        if self.analyzer is None:
            return []
        start = (now - self.lookback).replace(tzinfo=dt.timezone.utc)
        # the newest data: end at "now", so the analyzer's freshest window counts
        result = self.analyzer.incidents(service=None, start=start, end=now.replace(tzinfo=dt.timezone.utc))
        incidents = result.get("incidents", []) if isinstance(result, dict) else list(result or [])
        return [i for i in incidents if isinstance(i, dict) and i.get("id") is not None and i.get("service")]

    def evaluate(self) -> EvalResult:
        """One pass: fetch incidents, decide transitions, write alerts + outbox in one transaction."""
        with self._lock:
            now = self.clock()
            incidents = self.fetch_incidents(now)
            result = EvalResult(incidents=len(incidents))
            with self.sessions() as s:
                try:
                    self._evaluate(s, now, incidents, result)
                    s.commit()
                except IntegrityError:
                    # another server sharing the control DB opened the same alert first
                    s.rollback()
                    log.info("alert evaluation raced with another server; retrying next round")
                    return EvalResult(incidents=len(incidents))
            self.evaluations += 1
            self.last_evaluated_at = now
            self.last_error = None
        if result.enqueued:
            self.on_enqueue()
        return result

    def _evaluate(self, s: Session, now: dt.datetime, incidents: list[dict[str, Any]], result: EvalResult) -> None:
        rules = list(s.scalars(select(Rule).where(Rule.enabled.is_(True)).order_by(Rule.id)))
        silences = [x for x in s.scalars(select(Silence).where(Silence.ends_at > now)) if x.active(now)]
        ids = [str(i["id"]) for i in incidents]
        alerts = list(
            s.scalars(select(Alert).where(or_(Alert.state != "resolved", Alert.incident_id.in_(ids) if ids else false())))
        )
        by_incident = {a.incident_id: a for a in alerts}
        seen: set[int] = set()
        for inc in incidents:
            iid = str(inc["id"])
            alert = by_incident.get(iid)
            if alert is None and inc.get("open"):
                alert = self._adopt(alerts, inc, ids)
                if alert is not None:
                    by_incident.pop(alert.incident_id, None)
                    alert.incident_id = iid
                    by_incident[iid] = alert
            if alert is None:
                if not inc.get("open"):
                    continue  # history, not news: only incidents seen open page anyone
                matched = [r for r in rules if rule_matches(r, inc)] if rules else None
                if matched is not None and not matched:
                    continue
                alert = Alert(
                    incident_id=iid,
                    service=str(inc["service"]),
                    state="open",
                    seq=1,
                    top_cause=top_cause(inc),
                    incident_json=_dump(inc),
                    rule_ids_json=json.dumps([r.id for r in matched] if matched else []),
                    webhook_ids_json=json.dumps(_targets(s, matched)),
                    opened_at=now,
                    updated_at=now,
                    last_open_at=now,
                )
                s.add(alert)
                s.flush()
                alerts.append(alert)
                by_incident[iid] = alert
                seen.add(alert.id)
                result.opened.append(alert.id)
                self._notify(s, alert, inc, silences, now, result)
                continue
            seen.add(alert.id)
            alert.incident_json = _dump(inc)
            if inc.get("open"):
                alert.last_open_at = now
                if alert.state == "resolved":
                    alert.state, alert.seq, alert.resolved_at = "open", alert.seq + 1, None
                    alert.top_cause, alert.pending_cause, alert.updated_at = top_cause(inc), None, now
                    result.reopened.append(alert.id)
                    self._notify(s, alert, inc, silences, now, result)
                    continue
                new_top = top_cause(inc)
                if new_top != alert.top_cause:
                    if alert.pending_cause == new_top:
                        alert.state, alert.seq, alert.top_cause, alert.pending_cause, alert.updated_at = "updated", alert.seq + 1, new_top, None, now
                        result.updated.append(alert.id)
                        self._notify(s, alert, inc, silences, now, result)
                        continue
                    alert.pending_cause = new_top
                else:
                    alert.pending_cause = None
                self._catch_up(s, alert, inc, silences, now, result)
            elif alert.state != "resolved" and now - alert.last_open_at >= self.hold_down:
                self._resolve(s, alert, inc, silences, now, result)
            elif alert.state != "resolved":
                self._catch_up(s, alert, inc, silences, now, result)
        # alerts whose incident the analyzer no longer reports (retention, a re-grouping)
        for alert in alerts:
            if alert.id in seen or alert.state == "resolved":
                continue
            if now - alert.last_open_at >= self.hold_down:
                inc = alert.incident
                inc["open"] = False
                self._resolve(s, alert, inc, silences, now, result)

    def _adopt(self, alerts: list[Alert], inc: dict[str, Any], current_ids: list[str]) -> Alert | None:
        """An unresolved alert of the same service whose incident overlaps this one, if its id vanished."""
        start, end = parse_time(inc.get("start")), parse_time(inc.get("end"))
        if start is None or end is None:
            return None
        for alert in alerts:
            if alert.state == "resolved" or alert.service != inc.get("service") or alert.incident_id in current_ids:
                continue
            old = alert.incident
            o_start, o_end = parse_time(old.get("start")), parse_time(old.get("end"))
            if o_start is not None and o_end is not None and o_start <= end and start <= o_end:
                return alert
        return None

    def _resolve(self, s: Session, alert: Alert, inc: dict[str, Any], silences: list[Silence], now: dt.datetime, result: EvalResult) -> None:
        alert.state, alert.seq, alert.resolved_at, alert.updated_at, alert.pending_cause = "resolved", alert.seq + 1, now, now, None
        alert.incident_json = _dump(inc)
        result.resolved.append(alert.id)
        # a resolution is news only to whoever heard about the alert
        if alert.notified_state in (None, "resolved"):
            return
        self._notify(s, alert, inc, silences, now, result)

    def _catch_up(self, s: Session, alert: Alert, inc: dict[str, Any], silences: list[Silence], now: dt.datetime, result: EvalResult) -> None:
        """A silence ended while the alert was still open: send its current state now."""
        if alert.silenced and alert.notified_seq < alert.seq:
            self._notify(s, alert, inc, silences, now, result)

    def _notify(self, s: Session, alert: Alert, inc: dict[str, Any], silences: list[Silence], now: dt.datetime, result: EvalResult) -> None:
        muted = any(x.matches(alert.service, alert.top_cause) for x in silences)
        alert.silenced = muted
        if muted:
            return
        if alert.state == "updated" and alert.acknowledged_at is not None:
            # someone is on it: cause changes go to the dashboard, not to their phone
            alert.notified_seq = alert.seq
            return
        # someone who never heard of the alert (it was silenced) first hears "open"
        event = "open" if alert.state == "open" or (alert.notified_state is None and alert.state != "resolved") else alert.state
        link = formats.incident_link(self.base_url(), alert.incident_id)
        public = {k: v for k, v in alert.to_dict().items() if k != "incident"}
        hooks = _hooks(s, alert.webhook_ids)
        for hook in hooks:
            body = formats.render(hook.format, public, event, inc, link)
            s.add(
                Delivery(
                    alert_id=alert.id,
                    webhook_id=hook.id,
                    seq=alert.seq,
                    event=event,
                    idempotency_key=f"tailscope-alert-{alert.id}-{alert.seq}",
                    body=body,
                    status="pending",
                    next_attempt_at=now,
                    created_at=now,
                )
            )
            result.enqueued += 1
        alert.notified_seq, alert.notified_state = alert.seq, alert.state


def _dump(inc: dict[str, Any]) -> str:
    return json.dumps(inc, default=str, separators=(",", ":"))


def _targets(s: Session, rules: list[Rule] | None) -> list[int]:
    """Webhook ids named by the matched rules ([] means every enabled webhook)."""
    if not rules or any(not r.webhook_ids for r in rules):
        return []
    out: list[int] = []
    for r in rules:
        out.extend(i for i in r.webhook_ids if i not in out)
    return out


def _hooks(s: Session, webhook_ids: list[int]) -> list[Webhook]:
    q = select(Webhook).where(Webhook.enabled.is_(True)).order_by(Webhook.id)
    if webhook_ids:
        q = q.where(Webhook.id.in_(webhook_ids))
    return list(s.scalars(q))

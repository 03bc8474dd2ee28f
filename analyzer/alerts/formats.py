"""Webhook bodies: generic JSON, Slack incoming-webhook, Alertmanager v2.

Every body carries the same facts — the incident, its top causes with their
evidence and recommendation, and a link to the dashboard page — shaped for
the receiver. Bodies are built once, when the transition is decided, and
stored in the outbox, so a retry sends the same bytes (and signature input).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from analyzer.alerts.models import FORMATS

MAX_CAUSES = 3
"""Causes included in a message: the top few carry nearly all of the excess."""


def incident_link(base_url: str, incident_id: str) -> str:
    """The dashboard's incident page (``/dashboard/incident/<id>``, dashboard/app.py's route)."""
    return base_url.rstrip("/") + "/dashboard/incident/" + quote(str(incident_id), safe="")


def _ms(value: Any) -> str:
    try:
        return f"{float(value):.0f} ms"
    except (TypeError, ValueError):
        return "? ms"


def _share(value: Any) -> str:
    try:
        return f"{float(value) * 100:.0f}%"
    except (TypeError, ValueError):
        return "?%"


def top_causes(incident: dict[str, Any]) -> list[dict[str, Any]]:
    causes = [c for c in incident.get("causes") or [] if isinstance(c, dict)]
    causes.sort(key=lambda c: float(c.get("share") or 0.0), reverse=True)
    return causes[:MAX_CAUSES]


def summary(event: str, incident: dict[str, Any]) -> str:
    """One line a person reads on a phone: what, how bad, why, what to do."""
    service = incident.get("service", "?")
    head = {"open": "p99 spike", "updated": "p99 spike (cause changed)", "resolved": "recovered"}.get(event, event)
    line = f"[{event.upper()}] {service} {head}: p99 {_ms(incident.get('p99_ms'))} vs baseline {_ms(incident.get('baseline_p99_ms'))}"
    causes = top_causes(incident)
    if causes:
        top = causes[0]
        line += f"; top cause {top.get('cause')} ({_share(top.get('share'))} of excess)"
        rec = top.get("recommendation")
        if rec and event != "resolved":
            line += f" — {rec}"
    return line


def _evidence_text(evidence: Any, limit: int = 600) -> str:
    if evidence is None or evidence == "" or evidence == [] or evidence == {}:
        return ""
    text = evidence if isinstance(evidence, str) else json.dumps(evidence, default=str, separators=(", ", ": "))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def generic(alert: dict[str, Any], event: str, incident: dict[str, Any], link: str) -> dict[str, Any]:
    return {
        "version": 1,
        "source": "tailscope",
        "event": event,
        "summary": summary(event, incident),
        "alert": alert,
        "incident": {**incident, "causes": list(incident.get("causes") or [])},
        "top_causes": top_causes(incident),
        "url": link,
    }


def slack(alert: dict[str, Any], event: str, incident: dict[str, Any], link: str) -> dict[str, Any]:
    """Slack incoming-webhook message: ``text`` (notification fallback) + ``blocks``."""
    text = summary(event, incident)
    emoji = {"open": ":rotating_light:", "updated": ":warning:", "resolved": ":white_check_mark:"}.get(event, "")
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"{event.upper()}: {incident.get('service', '?')} p99 {_ms(incident.get('p99_ms'))}"[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": f"{emoji} {text}"[:3000]}},
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": f"*Window*\n{incident.get('start')} → {incident.get('end')}"},
                {"type": "mrkdwn", "text": f"*Requests*\n{incident.get('slow_requests', '?')} slow of {incident.get('requests', '?')}"},
            ],
        },
    ]
    for cause in top_causes(incident):
        lines = [f"*{cause.get('cause')}* — {_share(cause.get('share'))} of excess, {_ms(cause.get('excess_ms'))}"]
        if cause.get("recommendation"):
            lines.append(f"Fix: {cause['recommendation']}")
        ev = _evidence_text(cause.get("evidence"))
        if ev:
            lines.append(f"Evidence: `{ev}`")
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)[:3000]}})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{link}|Open in tailscope> · alert {alert.get('id')} · incident {incident.get('id')}"}]})
    return {"text": text, "blocks": blocks}


def alertmanager(alert: dict[str, Any], event: str, incident: dict[str, Any], link: str) -> list[dict[str, Any]]:
    """Alertmanager ``POST /api/v2/alerts`` body: a list of alerts.

    A firing alert has no ``endsAt`` (Alertmanager applies its resolve
    timeout); a resolved one carries ``endsAt`` so Alertmanager closes it.
    Labels identify the alert (stable across updates); annotations carry the text.
    """
    causes = top_causes(incident)
    top = causes[0] if causes else {}
    labels = {
        "alertname": "TailscopeP99Incident",
        "service": str(incident.get("service", "")),
        "incident_id": str(incident.get("id", "")),
        "severity": "page",
        "source": "tailscope",
    }
    annotations = {
        "summary": summary(event, incident),
        "top_cause": str(top.get("cause", "unknown")),
        "description": "; ".join(f"{c.get('cause')} {_share(c.get('share'))} ({_ms(c.get('excess_ms'))})" for c in causes),
        "recommendation": str(top.get("recommendation") or ""),
        "evidence": _evidence_text(top.get("evidence")),
        "p99_ms": str(incident.get("p99_ms", "")),
        "baseline_p99_ms": str(incident.get("baseline_p99_ms", "")),
        "event": event,
    }
    item: dict[str, Any] = {
        "labels": labels,
        "annotations": annotations,
        "startsAt": alert.get("opened_at") or incident.get("start"),
        "generatorURL": link,
    }
    if event == "resolved":
        item["endsAt"] = alert.get("resolved_at") or incident.get("end")
    return [item]


BUILDERS = {"generic": generic, "slack": slack, "alertmanager": alertmanager}


def render(fmt: str, alert: dict[str, Any], event: str, incident: dict[str, Any], link: str) -> str:
    """The body to store and send, as compact JSON text."""
    try:
        builder = BUILDERS[fmt]
    except KeyError:
        raise ValueError(f"unknown webhook format {fmt!r}: expected one of {', '.join(FORMATS)}") from None
    return json.dumps(builder(alert, event, incident, link), default=str, separators=(",", ":"), ensure_ascii=False)

"""``/api/v1/alerts…``: webhooks, rules, silences, alerts, deliveries.

Responses are JSON objects (never bare lists); errors are the server's one
``{ok: false, error, status}`` shape. Secrets go in and never come back out.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, Optional

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from tailscope.errors import BadRequest

if TYPE_CHECKING:
    from analyzer.alerts.service import AlertService


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="http(s) URL alerts are POSTed to")
    secret: str = Field("", description="HMAC-SHA256 key; stored, never returned")
    format: str = Field("generic", description="generic | slack | alertmanager")
    name: str = ""
    enabled: bool = True


class WebhookPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: Optional[str] = None
    secret: Optional[str] = Field(None, description="a new HMAC key (rotation); never returned")
    format: Optional[str] = None
    name: Optional[str] = None
    enabled: Optional[bool] = None


class RuleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    service: Optional[str] = None
    slo_ms: Optional[float] = None
    spike_factor: Optional[float] = None
    window_s: float = 0.0
    min_requests: int = 0
    causes: list[str] = Field(default_factory=list)
    webhook_ids: list[int] = Field(default_factory=list)
    enabled: bool = True


class SilenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    service: Optional[str] = None
    cause: Optional[str] = None
    duration_s: Optional[float] = None
    ends_at: Optional[str] = None
    comment: str = ""
    created_by: str = ""


class AckIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    by: str = ""
    comment: str = ""


def _parse_ends_at(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    from analyzer.alerts.evaluator import parse_time

    value = parse_time(text)
    if value is None:
        raise BadRequest(f"ends_at: {text!r} is not an RFC 3339 time")
    return value


def make_router(service: "AlertService") -> APIRouter:
    """The alerts API bound to one :class:`AlertService`."""
    router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"])

    def seen(request: Request) -> None:
        service.note_base_url(str(request.base_url))

    # static paths first: "/{alert_id}" would otherwise swallow them
    @router.post("/webhooks", status_code=201)
    def add_webhook(body: WebhookIn, request: Request) -> dict[str, Any]:
        seen(request)
        return {"ok": True, "webhook": service.add_webhook(body.url, body.secret, body.format, body.name, body.enabled)}

    @router.get("/webhooks")
    def list_webhooks() -> dict[str, Any]:
        return {"webhooks": service.list_webhooks()}

    @router.get("/webhooks/{webhook_id}")
    def get_webhook(webhook_id: int) -> dict[str, Any]:
        return {"webhook": service.get_webhook(webhook_id)}

    @router.patch("/webhooks/{webhook_id}")
    def update_webhook(webhook_id: int, body: WebhookPatch) -> dict[str, Any]:
        return {"ok": True, "webhook": service.update_webhook(webhook_id, **body.model_dump())}

    @router.delete("/webhooks/{webhook_id}")
    def delete_webhook(webhook_id: int) -> dict[str, Any]:
        return service.delete_webhook(webhook_id)

    @router.post("/webhooks/{webhook_id}/test")
    def test_webhook(webhook_id: int, request: Request) -> dict[str, Any]:
        seen(request)
        return service.test_webhook(webhook_id)

    @router.post("/rules", status_code=201)
    def add_rule(body: RuleIn) -> dict[str, Any]:
        return {"ok": True, "rule": service.add_rule(**body.model_dump())}

    @router.get("/rules")
    def list_rules() -> dict[str, Any]:
        rules = service.list_rules()
        return {"rules": rules, "default_rule_active": not any(r["enabled"] for r in rules)}

    @router.get("/rules/{rule_id}")
    def get_rule(rule_id: int) -> dict[str, Any]:
        return {"rule": service.get_rule(rule_id)}

    @router.put("/rules/{rule_id}")
    def replace_rule(rule_id: int, body: RuleIn) -> dict[str, Any]:
        return {"ok": True, "rule": service.replace_rule(rule_id, **body.model_dump())}

    @router.delete("/rules/{rule_id}")
    def delete_rule(rule_id: int) -> dict[str, Any]:
        return service.delete_rule(rule_id)

    @router.post("/silences", status_code=201)
    def add_silence(body: SilenceIn) -> dict[str, Any]:
        silence = service.add_silence(
            service=body.service,
            cause=body.cause,
            duration_s=body.duration_s,
            ends_at=_parse_ends_at(body.ends_at),
            comment=body.comment,
            created_by=body.created_by,
        )
        return {"ok": True, "silence": silence}

    @router.get("/silences")
    def list_silences(include_expired: bool = False) -> dict[str, Any]:
        return {"silences": service.list_silences(include_expired)}

    @router.delete("/silences/{silence_id}")
    def expire_silence(silence_id: int) -> dict[str, Any]:
        return {"ok": True, "silence": service.expire_silence(silence_id)}

    @router.get("/deliveries")
    def list_deliveries(alert_id: Optional[int] = None, status: Optional[str] = None, webhook_id: Optional[int] = None, limit: int = 100) -> dict[str, Any]:
        return {"deliveries": service.list_deliveries(alert_id, status, webhook_id, limit)}

    @router.get("/status")
    def status() -> dict[str, Any]:
        return service.status()

    @router.post("/evaluate")
    def evaluate(request: Request) -> dict[str, Any]:
        seen(request)
        return {"ok": True, **service.evaluate_now()}

    @router.get("")
    def list_alerts(state: Optional[str] = None, svc: Optional[str] = Query(None, alias="service"), limit: int = 100) -> dict[str, Any]:
        return {"alerts": service.list_alerts(state, svc, limit)}

    @router.get("/{alert_id}")
    def get_alert(alert_id: int) -> dict[str, Any]:
        return {"alert": service.get_alert(alert_id)}

    @router.post("/{alert_id}/ack")
    def acknowledge(alert_id: int, body: Optional[AckIn] = None) -> dict[str, Any]:
        body = body or AckIn()
        return {"ok": True, "alert": service.acknowledge(alert_id, body.by, body.comment)}

    return router

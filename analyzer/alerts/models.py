"""Control-plane tables for alerting (SQLAlchemy 2.0 declarative models).

Telemetry never lives here: only what a person configured (rules, webhooks,
silences) and what the alerting loop decided (alerts, the delivery outbox).
The same models run on SQLite (the default, a file next to the DuckDB store)
and on PostgreSQL (when several servers share one control plane), so they use
only portable types: naive UTC ``DateTime`` columns, ``Text`` for JSON.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

FORMATS = ("generic", "slack", "alertmanager")
"""Webhook payload formats: generic JSON, Slack incoming-webhook, Alertmanager v2 alerts."""

ALERT_STATES = ("open", "updated", "resolved")
"""An alert is ``open`` when its incident opens, ``updated`` when the top cause changes, ``resolved`` when p99 recovers."""

DELIVERY_STATUSES = ("pending", "delivered", "failed", "cancelled")
"""Outbox row states: waiting (or retrying), acknowledged by a 2xx, given up, or dropped (webhook deleted)."""


def utcnow() -> dt.datetime:
    """Naive UTC now: both SQLite and PostgreSQL store it unchanged."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def rfc3339(value: dt.datetime | None) -> str | None:
    """A naive-UTC column value as the API writes times (``...Z``)."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value.isoformat(timespec="milliseconds") + "Z"


class Base(DeclarativeBase):
    pass


class Rule(Base):
    """Which incidents page whom.

    An incident matches when every condition that is set holds: its service is
    ``service``; its p99 is at least ``slo_ms``; its p99 is at least
    ``spike_factor`` × its baseline p99; it has lasted ``window_s`` seconds;
    it covers at least ``min_requests`` requests; its top cause is one of
    ``causes``. Matching incidents go to ``webhook_ids`` (empty: every webhook).
    """

    __tablename__ = "alert_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    service: Mapped[str | None] = mapped_column(String(200), nullable=True)
    slo_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    spike_factor: Mapped[float | None] = mapped_column(Float, nullable=True)
    window_s: Mapped[float] = mapped_column(Float, default=0.0)
    min_requests: Mapped[int] = mapped_column(Integer, default=0)
    causes_json: Mapped[str] = mapped_column(Text, default="[]")
    webhook_ids_json: Mapped[str] = mapped_column(Text, default="[]")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    @property
    def causes(self) -> list[str]:
        return list(json.loads(self.causes_json or "[]"))

    @property
    def webhook_ids(self) -> list[int]:
        return [int(i) for i in json.loads(self.webhook_ids_json or "[]")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "service": self.service,
            "slo_ms": self.slo_ms,
            "spike_factor": self.spike_factor,
            "window_s": self.window_s,
            "min_requests": self.min_requests,
            "causes": self.causes,
            "webhook_ids": self.webhook_ids,
            "enabled": self.enabled,
            "created_at": rfc3339(self.created_at),
        }


class Webhook(Base):
    """Where alerts are POSTed. The secret signs each body and is never returned."""

    __tablename__ = "alert_webhooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(Text, default="")
    format: Mapped[str] = mapped_column(String(32), default="generic")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Silence(Base):
    """Mute notifications for a service and/or cause until ``ends_at``.

    Alerts are still tracked while silenced; only their deliveries are held
    back (an alert still open when the silence ends is then sent).
    """

    __tablename__ = "alert_silences"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    service: Mapped[str | None] = mapped_column(String(200), nullable=True)
    cause: Mapped[str | None] = mapped_column(String(64), nullable=True)
    starts_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    ends_at: Mapped[dt.datetime] = mapped_column(DateTime)
    comment: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    def active(self, now: dt.datetime) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, service: str, cause: str | None) -> bool:
        return (self.service in (None, "", service)) and (self.cause in (None, "", cause))

    def to_dict(self, now: dt.datetime | None = None) -> dict[str, Any]:
        now = now or utcnow()
        return {
            "id": self.id,
            "service": self.service,
            "cause": self.cause,
            "starts_at": rfc3339(self.starts_at),
            "ends_at": rfc3339(self.ends_at),
            "comment": self.comment,
            "created_by": self.created_by,
            "active": self.active(now),
        }


class Alert(Base):
    """One alert per incident, with the state the evaluator last decided.

    ``seq`` counts transitions (open → updated … → resolved); each transition
    that is notified gets one outbox row per webhook, keyed by
    ``(alert, seq, webhook)`` so it is sent once.
    """

    __tablename__ = "alerts"
    __table_args__ = (UniqueConstraint("incident_id", name="uq_alerts_incident"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    incident_id: Mapped[str] = mapped_column(String(200))
    service: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), default="open")
    seq: Mapped[int] = mapped_column(Integer, default=1)
    top_cause: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # a different top cause seen once; sent as an update when seen again (no flapping)
    pending_cause: Mapped[str | None] = mapped_column(String(64), nullable=True)
    incident_json: Mapped[str] = mapped_column(Text, default="{}")
    rule_ids_json: Mapped[str] = mapped_column(Text, default="[]")
    webhook_ids_json: Mapped[str] = mapped_column(Text, default="[]")
    opened_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_open_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    notified_seq: Mapped[int] = mapped_column(Integer, default=0)
    notified_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    silenced: Mapped[bool] = mapped_column(Boolean, default=False)
    acknowledged_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    acknowledged_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    ack_comment: Mapped[str | None] = mapped_column(Text, nullable=True)

    @property
    def incident(self) -> dict[str, Any]:
        return json.loads(self.incident_json or "{}")

    @property
    def webhook_ids(self) -> list[int]:
        return [int(i) for i in json.loads(self.webhook_ids_json or "[]")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "incident_id": self.incident_id,
            "service": self.service,
            "state": self.state,
            "seq": self.seq,
            "top_cause": self.top_cause,
            "opened_at": rfc3339(self.opened_at),
            "updated_at": rfc3339(self.updated_at),
            "resolved_at": rfc3339(self.resolved_at),
            "silenced": self.silenced,
            "acknowledged": self.acknowledged_at is not None,
            "acknowledged_at": rfc3339(self.acknowledged_at),
            "acknowledged_by": self.acknowledged_by,
            "ack_comment": self.ack_comment,
            "rule_ids": json.loads(self.rule_ids_json or "[]"),
            "webhook_ids": self.webhook_ids,
            "incident": self.incident,
        }


class Delivery(Base):
    """The outbox and the delivery log in one table.

    A row is written in the same transaction as the alert transition it
    announces, so a crash cannot lose it; the sender claims due rows with a
    short lease (a conditional UPDATE, portable to PostgreSQL with several
    servers), sends the stored body byte for byte, and marks the row
    delivered. ``idempotency_key`` is sent as a header so a receiver can drop
    the duplicate that a crash between its 2xx and our commit would cause.
    """

    __tablename__ = "alert_deliveries"
    __table_args__ = (
        UniqueConstraint("alert_id", "seq", "webhook_id", name="uq_deliveries_alert_seq_webhook"),
        Index("ix_deliveries_status_due", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alert_id: Mapped[int | None] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"), nullable=True)
    webhook_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    event: Mapped[str] = mapped_column(String(16))
    idempotency_key: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "alert_id": self.alert_id,
            "webhook_id": self.webhook_id,
            "seq": self.seq,
            "event": self.event,
            "idempotency_key": self.idempotency_key,
            "status": self.status,
            "attempts": self.attempts,
            "next_attempt_at": rfc3339(self.next_attempt_at) if self.status == "pending" else None,
            "last_status_code": self.last_status_code,
            "last_error": self.last_error,
            "created_at": rfc3339(self.created_at),
            "delivered_at": rfc3339(self.delivered_at),
        }

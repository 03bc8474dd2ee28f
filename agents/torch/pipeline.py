"""The OpenTelemetry SDK pipelines one handle exports through.

Each handle owns its providers (never the global ones), so several handles
can coexist in one process, e.g. one per replica in the lab, each with its own
``service.instance.id`` resource:

- traces: ``TracerProvider`` + ``BatchSpanProcessor(OTLPSpanExporter(.../v1/traces))``
- events: ``LoggerProvider`` + ``BatchLogRecordProcessor(OTLPLogExporter(.../v1/logs))``
- gauges: ``MeterProvider`` + ``PeriodicExportingMetricReader(OTLPMetricExporter(.../v1/metrics))``

All export happens on the SDK's background threads; an unreachable server
costs the caller nothing (the SDK logs and drops after its own retries).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping

from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

SCOPE_NAME = "tailscope.agents.torch"


@dataclass(frozen=True)
class ExportOptions:
    """Knobs of the background export (defaults suit a busy serving process).

    The span queue is large because a lab replica can end thousands of spans
    a second; the SDK drops (and counts) beyond it rather than block.
    """

    export_interval_s: float = 5.0
    schedule_delay_s: float = 0.5
    max_queue_size: int = 65536
    max_export_batch_size: int = 2048
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.export_interval_s <= 0 or self.schedule_delay_s <= 0 or self.timeout_s <= 0:
            raise ValueError("export intervals and timeouts must be positive")
        if self.max_export_batch_size > self.max_queue_size:
            raise ValueError(
                f"max_export_batch_size ({self.max_export_batch_size}) must not exceed "
                f"max_queue_size ({self.max_queue_size})"
            )


def build_resource(
    service: str,
    instance_id: str | None,
    host_name: str | None,
    extra: Mapping[str, Any] | None,
) -> Resource:
    """Resource attributes of spec section 2; ``extra`` may add or override."""
    if not isinstance(service, str) or not service:
        raise ValueError(f"service must be a non-empty string, got {service!r}")
    host = host_name or socket.gethostname()
    attrs: dict[str, Any] = {
        "service.name": service,
        "service.instance.id": instance_id or f"{host}:{os.getpid()}",
        "host.name": host,
        "process.pid": os.getpid(),
    }
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, (str, bool, int, float)):
            raise TypeError(f"resource attribute {key!r} must map a name to a scalar, got {value!r}")
        attrs[key] = value
    return Resource.create(attrs)


def _base_url(endpoint: str) -> str:
    if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"endpoint must be an http(s) URL such as http://127.0.0.1:4318, got {endpoint!r}")
    return endpoint.rstrip("/")


class Pipeline:
    """Providers, processors and exporters for one handle."""

    def __init__(
        self,
        endpoint: str,
        resource: Resource,
        token: str | None,
        options: ExportOptions,
    ) -> None:
        base = _base_url(endpoint)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self.resource = resource
        self.scope = InstrumentationScope(SCOPE_NAME)

        self.span_exporter = OTLPSpanExporter(
            endpoint=base + "/v1/traces", headers=headers, timeout=options.timeout_s
        )
        self.span_processor = BatchSpanProcessor(
            self.span_exporter,
            max_queue_size=options.max_queue_size,
            schedule_delay_millis=options.schedule_delay_s * 1000,
            max_export_batch_size=options.max_export_batch_size,
            export_timeout_millis=options.timeout_s * 1000,
        )
        self.tracer_provider = TracerProvider(resource=resource)
        self.tracer_provider.add_span_processor(self.span_processor)

        self.logger_provider = LoggerProvider(resource=resource)
        self.logger_provider.add_log_record_processor(
            BatchLogRecordProcessor(
                OTLPLogExporter(endpoint=base + "/v1/logs", headers=headers, timeout=options.timeout_s),
                schedule_delay_millis=options.schedule_delay_s * 1000,
            )
        )
        self.logger = self.logger_provider.get_logger(SCOPE_NAME)

        self.metric_reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=base + "/v1/metrics", headers=headers, timeout=options.timeout_s),
            export_interval_millis=options.export_interval_s * 1000,
        )
        self.meter_provider = MeterProvider(resource=resource, metric_readers=[self.metric_reader])
        self.meter = self.meter_provider.get_meter(SCOPE_NAME)

    def flush(self, timeout_s: float) -> bool:
        """Export everything queued; True when every pipeline confirmed in time."""
        ms = int(timeout_s * 1000)
        ok = self.tracer_provider.force_flush(ms)
        ok = bool(self.logger_provider.force_flush(ms)) and ok
        ok = bool(self.meter_provider.force_flush(ms)) and ok
        return ok

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.logger_provider.shutdown()
        self.meter_provider.shutdown()

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
import threading
from dataclasses import dataclass
from typing import Any, Mapping

from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

SCOPE_NAME = "tailscope.agents.torch"


class _Counting:
    """Wraps an OTLP exporter and counts refused or failed exports.

    The SDK's ``force_flush`` only says the queue was drained, not that the
    server accepted it (a 401 is logged and dropped); ``Handle.flush`` uses
    these counts so that a refused export is never reported as success.
    """

    def __init__(self, inner: Any, signal: str, pipeline: Pipeline) -> None:
        self._inner = inner
        self._signal = signal
        self._pipeline = pipeline

    def export(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        result = self._inner.export(batch, *args, **kwargs)
        items = len(batch) if hasattr(batch, "__len__") else 1
        if getattr(result, "name", "SUCCESS") != "SUCCESS":
            self._pipeline._count_failure(self._signal, items)
        else:
            self._pipeline._count_success(self._signal, items)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


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


class _CountingMetrics(MetricExporter):
    """The metric reader needs a real ``MetricExporter`` (it reads its temporality)."""

    def __init__(self, inner: OTLPMetricExporter, pipeline: Pipeline) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self._inner = inner
        self._pipeline = pipeline

    def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        result = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        if result is not MetricExportResult.SUCCESS:
            self._pipeline._count_failure("metrics", 1)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class _Resource(Resource):
    """A ``Resource`` that hashes once.

    The OTLP encoder groups every span by resource, and ``Resource.__hash__``
    serialises the attributes to JSON on each call: about a fifth of the
    background encoding time measured per span. Resources are immutable, so
    the hash can be kept.
    """

    def __init__(self, attributes: Any, schema_url: str | None = None) -> None:
        super().__init__(attributes, schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other)


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
    created = Resource.create(attrs)
    return _Resource(created.attributes, created.schema_url)


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
        self._failure_lock = threading.Lock()
        self.failed_exports: dict[str, int] = {"spans": 0, "logs": 0, "metrics": 0}
        self.failed_items: dict[str, int] = {"spans": 0, "logs": 0, "metrics": 0}
        self.exported_items: dict[str, int] = {"spans": 0, "logs": 0}
        self.recorded_items: dict[str, int] = {"spans": 0, "logs": 0}  # counted by the handle
        self._failures_seen = 0
        self._dropped_seen = 0
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self.resource = resource
        self.scope = InstrumentationScope(SCOPE_NAME)

        self.span_exporter = OTLPSpanExporter(
            endpoint=base + "/v1/traces", headers=headers, timeout=options.timeout_s
        )
        self.span_processor = BatchSpanProcessor(
            _Counting(self.span_exporter, "spans", self),  # type: ignore[arg-type]
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
                _Counting(  # type: ignore[arg-type]
                    OTLPLogExporter(endpoint=base + "/v1/logs", headers=headers, timeout=options.timeout_s),
                    "logs",
                    self,
                ),
                schedule_delay_millis=options.schedule_delay_s * 1000,
            )
        )
        self.logger = self.logger_provider.get_logger(SCOPE_NAME)

        self.metric_reader = PeriodicExportingMetricReader(
            _CountingMetrics(
                OTLPMetricExporter(endpoint=base + "/v1/metrics", headers=headers, timeout=options.timeout_s),
                self,
            ),
            export_interval_millis=options.export_interval_s * 1000,
        )
        self.meter_provider = MeterProvider(resource=resource, metric_readers=[self.metric_reader])
        self.meter = self.meter_provider.get_meter(SCOPE_NAME)

    def count_recorded(self, signal: str) -> None:
        with self._failure_lock:  # += on a dict item is not atomic across threads
            self.recorded_items[signal] += 1

    def _count_success(self, signal: str, items: int) -> None:
        with self._failure_lock:
            self.exported_items[signal] += items

    def dropped_items(self) -> dict[str, int]:
        """Recorded but neither exported nor failed: dropped by a full SDK queue.

        Exact once a flush has drained the queues (in flight otherwise).
        """
        with self._failure_lock:
            return {
                sig: max(0, self.recorded_items[sig] - self.exported_items[sig] - self.failed_items[sig])
                for sig in self.recorded_items
            }

    def _count_failure(self, signal: str, items: int) -> None:
        with self._failure_lock:
            self.failed_exports[signal] += 1
            self.failed_items[signal] += items

    def flush(self, timeout_s: float) -> bool:
        """Export everything queued.

        Returns True when every pipeline drained in time and no export failed
        since the previous flush (so everything recorded since then arrived).
        """
        ms = int(timeout_s * 1000)
        ok = bool(self.tracer_provider.force_flush(ms))
        ok = bool(self.logger_provider.force_flush(ms)) and ok
        ok = bool(self.meter_provider.force_flush(ms)) and ok
        dropped = sum(self.dropped_items().values()) if ok else self._dropped_seen
        with self._failure_lock:
            total = sum(self.failed_exports.values())
            fresh = total != self._failures_seen or dropped != self._dropped_seen
            self._failures_seen = total
            self._dropped_seen = dropped
        return ok and not fresh

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.logger_provider.shutdown()
        self.meter_provider.shutdown()

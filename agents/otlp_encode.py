"""The agent's telemetry items and their OTLP/protobuf encoding.

Sources produce plain :class:`MetricPoint` and :class:`LogEvent` objects (cheap
to build, no protobuf on the hot path); the sender groups a batch of them by
resource and encodes one ``ExportMetricsServiceRequest`` / ``ExportLogsServiceRequest``
with the opentelemetry-proto classes, so any OTLP receiver understands them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_CUMULATIVE,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

SCOPE_NAME = "tailscope.agent"
SCOPE_VERSION = "0.1.0"

Attributes = Mapping[str, Any]

__all__ = ["MetricPoint", "LogEvent", "encode_metrics", "encode_logs", "SCOPE_NAME"]


def _freeze(attrs: Attributes) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(attrs.items()))


@dataclass(frozen=True)
class MetricPoint:
    """One metric data point.

    ``kind`` is ``gauge``, ``sum`` (cumulative; ``monotonic`` for counters) or
    ``histogram`` (``bucket_counts`` per bucket, not cumulative, one more than
    ``explicit_bounds``; ``hist_sum`` may be ``None`` when the source had none).
    """

    name: str
    value: float | int | None
    time_unix_nano: int
    attributes: tuple[tuple[str, Any], ...] = ()
    resource: tuple[tuple[str, Any], ...] = ()
    kind: str = "gauge"
    unit: str = ""
    description: str = ""
    monotonic: bool = False
    start_time_unix_nano: int = 0
    bucket_counts: tuple[int, ...] = ()
    explicit_bounds: tuple[float, ...] = ()
    count: int = 0
    hist_sum: float | None = None

    @classmethod
    def make(cls, name: str, value: float | int | None, time_unix_nano: int, attributes: Attributes | None = None,
             resource: Attributes | None = None, **kw: Any) -> "MetricPoint":
        return cls(name, value, time_unix_nano, _freeze(attributes or {}), _freeze(resource or {}), **kw)


@dataclass(frozen=True)
class LogEvent:
    """One log record / event (``event_name`` goes to both ``eventName`` and ``event.name``)."""

    event_name: str
    time_unix_nano: int
    attributes: tuple[tuple[str, Any], ...] = ()
    resource: tuple[tuple[str, Any], ...] = ()
    body: str = ""
    severity_number: int = 17  # ERROR
    severity_text: str = "ERROR"

    @classmethod
    def make(cls, event_name: str, time_unix_nano: int, attributes: Attributes | None = None,
             resource: Attributes | None = None, **kw: Any) -> "LogEvent":
        return cls(event_name, time_unix_nano, _freeze(attributes or {}), _freeze(resource or {}), **kw)


def any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    return AnyValue(string_value=str(value))


def key_values(attrs: Iterable[tuple[str, Any]]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attrs]


def _number_point(p: MetricPoint) -> NumberDataPoint:
    dp = NumberDataPoint(time_unix_nano=p.time_unix_nano, attributes=key_values(p.attributes))
    if p.start_time_unix_nano:
        dp.start_time_unix_nano = p.start_time_unix_nano
    if isinstance(p.value, int) and not isinstance(p.value, bool):
        dp.as_int = p.value
    else:
        dp.as_double = float(p.value if p.value is not None else math.nan)
    return dp


def _hist_point(p: MetricPoint) -> HistogramDataPoint:
    dp = HistogramDataPoint(
        time_unix_nano=p.time_unix_nano,
        start_time_unix_nano=p.start_time_unix_nano,
        attributes=key_values(p.attributes),
        count=p.count,
        bucket_counts=list(p.bucket_counts),
        explicit_bounds=list(p.explicit_bounds),
    )
    if p.hist_sum is not None:
        dp.sum = p.hist_sum
    return dp


def encode_metrics(points: Sequence[MetricPoint]) -> bytes:
    """One ``ExportMetricsServiceRequest``: a ResourceMetrics per resource, a Metric per (name, kind)."""
    by_resource: dict[tuple, dict[tuple, list[MetricPoint]]] = {}
    for p in points:
        metrics = by_resource.setdefault(p.resource, {})
        metrics.setdefault((p.name, p.kind, p.monotonic, p.unit), []).append(p)
    req = ExportMetricsServiceRequest()
    for resource, metrics in by_resource.items():
        rm = ResourceMetrics(resource=Resource(attributes=key_values(resource)))
        sm = ScopeMetrics(scope=InstrumentationScope(name=SCOPE_NAME, version=SCOPE_VERSION))
        for (name, kind, monotonic, unit), pts in metrics.items():
            m = Metric(name=name, unit=unit, description=pts[0].description)
            if kind == "gauge":
                m.gauge.CopyFrom(Gauge(data_points=[_number_point(p) for p in pts]))
            elif kind == "sum":
                m.sum.CopyFrom(Sum(data_points=[_number_point(p) for p in pts], is_monotonic=monotonic,
                                   aggregation_temporality=AGGREGATION_TEMPORALITY_CUMULATIVE))
            elif kind == "histogram":
                m.histogram.CopyFrom(Histogram(data_points=[_hist_point(p) for p in pts],
                                               aggregation_temporality=AGGREGATION_TEMPORALITY_CUMULATIVE))
            else:
                raise ValueError(f"unknown metric kind {kind!r} for {name!r}")
            sm.metrics.append(m)
        rm.scope_metrics.append(sm)
        req.resource_metrics.append(rm)
    return req.SerializeToString()


def encode_logs(events: Sequence[LogEvent]) -> bytes:
    """One ``ExportLogsServiceRequest`` grouped by resource."""
    by_resource: dict[tuple, list[LogEvent]] = {}
    for e in events:
        by_resource.setdefault(e.resource, []).append(e)
    req = ExportLogsServiceRequest()
    for resource, evs in by_resource.items():
        rl = ResourceLogs(resource=Resource(attributes=key_values(resource)))
        sl = ScopeLogs(scope=InstrumentationScope(name=SCOPE_NAME, version=SCOPE_VERSION))
        for e in evs:
            attrs = dict(e.attributes)
            attrs.setdefault("event.name", e.event_name)
            rec = LogRecord(
                time_unix_nano=e.time_unix_nano,
                observed_time_unix_nano=e.time_unix_nano,
                severity_number=e.severity_number,
                severity_text=e.severity_text,
                attributes=key_values(sorted(attrs.items())),
            )
            if e.body:
                rec.body.CopyFrom(AnyValue(string_value=e.body))
            if "event_name" in LogRecord.DESCRIPTOR.fields_by_name:  # newer proto versions
                rec.event_name = e.event_name
            sl.log_records.append(rec)
        rl.scope_logs.append(sl)
        req.resource_logs.append(rl)
    return req.SerializeToString()



"""``instrument(...)`` and the handle it returns (docs/instrumentation.md).

The handle is what serving code calls: request / stage / batch spans, KV and
replica events, the KV-usage gauge, flush and shutdown. Compile spans come
from ``compile_events`` (torch's own hooks) and are exported through the
handle whose span is active on the compiling thread.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Mapping

from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, set_span_in_context

from agents.torch import context
from agents.torch.attributes import (
    BATCH_ID,
    BATCH_NAMES,
    KV_REASONS,
    ROLE,
    STAGES,
    check_attributes,
    map_keywords,
)
from agents.torch.pipeline import ExportOptions, Pipeline, build_resource
from agents.torch.spans import Span, to_ns

log = logging.getLogger(__name__)

REQUEST_SPAN_NAME = "request"
BATCH_SPAN_NAME = "batch"

EVENT_KV_EVICTION = "tailscope.kv.eviction"
EVENT_REPLICA_READY = "tailscope.replica.ready"
EVENT_COMPILE_LIMIT = "tailscope.compile.limit_hit"
KV_USAGE_METRIC = "tailscope.kv.usage"


def instrument(
    service: str,
    endpoint: str = "http://127.0.0.1:4318",
    instance_id: str | None = None,
    host_name: str | None = None,
    token: str | None = None,
    resource: Mapping[str, Any] | None = None,
    compile_events: bool = True,
    *,
    export_interval_s: float = 5.0,
    schedule_delay_s: float = 0.5,
    max_queue_size: int = 65536,
    max_export_batch_size: int = 2048,
) -> Handle:
    """Start exporting this process's inference telemetry to a tailscope server.

    Args:
        service: ``service.name``.
        endpoint: OTLP/HTTP base URL; ``/v1/traces``, ``/v1/logs`` and
            ``/v1/metrics`` are appended.
        instance_id: ``service.instance.id`` (default ``host:pid``).
        host_name: ``host.name`` (default ``socket.gethostname()``).
        token: bearer token for the server's ingest auth.
        resource: extra resource attributes, e.g. ``{"tailscope.pool": "realtime"}``.
        compile_events: hook torch.compile (imports torch).
        export_interval_s: how often the KV-usage gauge is exported.
        schedule_delay_s: the span / log batch delay.
        max_queue_size: spans held for export before the SDK starts dropping.
        max_export_batch_size: spans per export request (an export starts
            early once this many are queued).

    Raises:
        ValueError / TypeError: a bad argument, named in the message.
    """
    options = ExportOptions(
        export_interval_s=export_interval_s,
        schedule_delay_s=schedule_delay_s,
        max_queue_size=max_queue_size,
        max_export_batch_size=max_export_batch_size,
    )
    res = build_resource(service, instance_id, host_name, resource)
    handle = Handle(Pipeline(endpoint, res, token, options))
    if compile_events:
        try:
            from agents.torch import compile_events as ce

            ce.watcher().register(handle)
            handle._compile_registered = True
        except ImportError as exc:  # no torch here: spans and events still work
            log.warning("tailscope: compile events are off because torch cannot be imported (%s)", exc)
    return handle


class Handle:
    """The instrumentation of one serving process or replica."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._processor = pipeline.span_processor
        self._kv_usage: float | None = None
        self._kv_gauge = pipeline.meter.create_observable_gauge(
            KV_USAGE_METRIC,
            callbacks=[self._observe_kv],
            unit="1",
            description="ratio of KV-cache blocks in use",
        )
        self._compile_registered = False
        self._closed = False
        self._warned_closed = False

    # -- properties --------------------------------------------------------
    @property
    def resource(self) -> Mapping[str, Any]:
        return self._pipeline.resource.attributes

    @property
    def instance_id(self) -> str:
        return str(self._pipeline.resource.attributes["service.instance.id"])

    @property
    def failed_exports(self) -> dict[str, int]:
        """Items the server refused or that could not be sent, per signal (spans/logs/metrics)."""
        return dict(self._pipeline.failed_items)

    def stats(self) -> dict[str, dict[str, int]]:
        """Recorded / exported / failed / dropped (full queue) items per signal.

        ``dropped`` is exact after a ``flush()``; a serving process that ends
        spans faster than the exporter sends them loses the overflow rather
        than block, and this is where that shows.
        """
        p = self._pipeline
        return {
            "recorded": dict(p.recorded_items),
            "exported": dict(p.exported_items),
            "failed": dict(p.failed_items),
            "dropped": p.dropped_items(),
        }

    @property
    def tracer_provider(self) -> Any:
        """This handle's own SDK ``TracerProvider`` (for any extra spans)."""
        return self._pipeline.tracer_provider

    # -- spans -------------------------------------------------------------
    def start_request(
        self,
        start_time: float | None = None,
        name: str = REQUEST_SPAN_NAME,
        parent: Span | SpanContext | None = None,
        attributes: Mapping[str, Any] | None = None,
        **keywords: Any,
    ) -> Span:
        """Start a request span (kind SERVER, ``tailscope.role=request``).

        Keywords are the short names of ``attributes.SHORT_NAMES``.
        """
        attrs: dict[str, Any] = {ROLE: "request"}
        if keywords:
            map_keywords(keywords, attrs)
        if attributes:
            check_attributes(attributes, attrs)
        return Span(self, name, SpanKind.SERVER, parent, attrs, to_ns(start_time))

    def request(self, **kwargs: Any) -> Span:
        """``with h.request(model=...) as req:`` a request span made active on this thread."""
        return self.start_request(**kwargs)

    def start_stage(
        self,
        stage: str,
        parent: Span | None = None,
        start_time: float | None = None,
        attributes: Mapping[str, Any] | None = None,
        **keywords: Any,
    ) -> Span:
        """Start a stage span: queue | prefill | decode | provider_call | model_load.

        ``parent`` defaults to the span active on this thread (a root span if none).
        ``provider_call`` is a CLIENT span and takes ``system``, ``server_address``
        and ``region`` (IANA zone).
        """
        try:
            client = STAGES[stage]
        except (KeyError, TypeError):
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}") from None
        if parent is None:
            parent = context.current()
        attrs: dict[str, Any] = {ROLE: stage}
        if keywords:
            map_keywords(keywords, attrs)
        if attributes:
            check_attributes(attributes, attrs)
        kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
        return Span(self, stage, kind, parent, attrs, to_ns(start_time), activates=False)

    def stage(self, stage: str, parent: Span | None = None, **kwargs: Any) -> Span:
        """``with h.stage("prefill", parent=req):`` a stage span (not made active).

        Ends when the block exits, as an error if an exception escaped.
        """
        return self.start_stage(stage, parent=parent, **kwargs)

    def start_batch(
        self,
        batch_id: str,
        members: list[Span] | tuple[Span, ...] = (),
        start_time: float | None = None,
        attributes: Mapping[str, Any] | None = None,
        **keywords: Any,
    ) -> Span:
        """Start a batch span linked to its member request spans.

        Each member gets ``tailscope.batch.id``; members must still be open.
        Keywords: ``size`` (default ``len(members)``), ``max_len``, ``min_len``,
        ``real_tokens``, ``padded_tokens``, ``wait_s``.
        """
        if not isinstance(batch_id, str) or not batch_id:
            raise TypeError(f"batch_id must be a non-empty string, got {batch_id!r}")
        attrs: dict[str, Any] = {ROLE: "batch", BATCH_ID: batch_id}
        keywords.setdefault("size", len(members))
        map_keywords(keywords, attrs, BATCH_NAMES)
        if attributes:
            check_attributes(attributes, attrs)
        span = Span(self, BATCH_SPAN_NAME, SpanKind.INTERNAL, None, attrs, to_ns(start_time))
        for member in members:
            if not isinstance(member, Span):
                raise TypeError(f"batch members are request spans, got {member!r}")
            if member.ended:
                raise RuntimeError(
                    f"batch {batch_id!r}: member {member.span_id} has already ended; "
                    "start the batch while its requests are open"
                )
            span.add_link(member)
            member.attributes[BATCH_ID] = batch_id
        return span

    def batch(self, batch_id: str, members: list[Span] | tuple[Span, ...] = (), **kwargs: Any) -> Span:
        """``with h.batch("b-1", members=[...]) as b:`` a batch span made active."""
        return self.start_batch(batch_id, members, **kwargs)

    @contextlib.contextmanager
    def active(self, span: Span) -> Iterator[Span]:
        """Make ``span`` the active span of this thread (compile spans nest under it)."""
        if not isinstance(span, Span):
            raise TypeError(f"active() takes a span from this instrumentation, got {span!r}")
        context.push(span)
        try:
            yield span
        finally:
            context.pop(span)

    def _export_span(self, span: Span) -> None:
        if self._closed:
            self._dropped_after_shutdown("spans")
            return
        self._pipeline.count_recorded("spans")
        self._processor.on_end(span.to_readable())

    def _dropped_after_shutdown(self, signal: str) -> None:
        self._pipeline.count_recorded(signal)
        self._pipeline._count_failure(signal, 1)
        if not self._warned_closed:
            self._warned_closed = True
            log.warning("tailscope: %s recorded after shutdown() are dropped (counted in failed_exports)", signal)

    # -- events and gauges -------------------------------------------------
    def _emit_event(
        self,
        name: str,
        attributes: dict[str, Any],
        time_ns: int | None = None,
        span: Span | None = None,
        severity: SeverityNumber = SeverityNumber.INFO,
        body: str | None = None,
    ) -> None:
        if self._closed:
            self._dropped_after_shutdown("logs")
            return
        attributes["event.name"] = name
        ctx = None
        if span is not None:
            ctx = set_span_in_context(NonRecordingSpan(span.context))
        now = time_ns if time_ns is not None else to_ns(None)
        kwargs: dict[str, Any] = dict(
            timestamp=now,
            observed_timestamp=now,
            context=ctx,
            severity_number=severity,
            severity_text=severity.name,
            body=body if body is not None else name,
            attributes=attributes,
        )
        try:
            record = LogRecord(event_name=name, **kwargs)
        except TypeError:
            # SDKs before 1.35 (tested: 1.45.2): no event_name / context on the
            # record; the event.name attribute alone names the event.
            record = self._legacy_record(kwargs, span)
        self._pipeline.count_recorded("logs")
        self._pipeline.logger.emit(record)

    def _legacy_record(self, kwargs: dict[str, Any], span: Span | None) -> Any:
        from opentelemetry.sdk._logs import LogRecord as SDKLogRecord
        from opentelemetry.trace import TraceFlags

        kwargs.pop("context", None)
        if span is not None:
            kwargs.update(trace_id=span.trace_id_int, span_id=span.span_id_int, trace_flags=TraceFlags(1))
        return SDKLogRecord(resource=self._pipeline.resource, **kwargs)

    def kv_eviction(
        self,
        blocks: int,
        reason: str,
        victim: Span | None = None,
        usage: float | None = None,
        time: float | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """Log event ``tailscope.kv.eviction`` (spec 7)."""
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
            raise TypeError(f"blocks must be a non-negative int, got {blocks!r}")
        if reason not in KV_REASONS:
            raise ValueError(f"unknown KV eviction reason {reason!r}; expected one of {', '.join(KV_REASONS)}")
        attrs: dict[str, Any] = {"tailscope.kv.blocks": blocks, "tailscope.kv.reason": reason}
        if victim is not None:
            if not isinstance(victim, Span):
                raise TypeError(f"victim must be a request span, got {victim!r}")
            attrs["tailscope.kv.victim_trace_id"] = victim.trace_id
        if usage is not None:
            attrs["tailscope.kv.usage"] = _ratio("usage", usage)
        if attributes:
            check_attributes(attributes, attrs)
        self._emit_event(EVENT_KV_EVICTION, attrs, to_ns(time), span=victim or context.current())

    def replica_ready(self, load_seconds: float, time: float | None = None) -> None:
        """Log event ``tailscope.replica.ready`` (spec 7)."""
        if isinstance(load_seconds, bool) or not isinstance(load_seconds, (int, float)) or load_seconds < 0:
            raise TypeError(f"load_seconds must be a non-negative number, got {load_seconds!r}")
        attrs = {"tailscope.replica.load_seconds": float(load_seconds)}
        self._emit_event(EVENT_REPLICA_READY, attrs, to_ns(time))

    def set_kv_usage(self, usage: float) -> None:
        """Gauge ``tailscope.kv.usage`` (0-1), exported every ``export_interval_s``.

        Metric points carry the export time, not a caller time (OTel gauges
        have no explicit timestamps); use ``kv_eviction(usage=...)`` for
        readings that must sit at a virtual time.
        """
        self._kv_usage = _ratio("usage", usage)

    def _observe_kv(self, options: Any) -> Any:
        from opentelemetry.metrics import Observation

        if self._kv_usage is None:
            return []
        return [Observation(self._kv_usage)]

    # -- lifecycle ---------------------------------------------------------
    def flush(self, timeout_s: float = 10.0) -> bool:
        """Export everything recorded so far.

        True when it drained within ``timeout_s`` and nothing failed or was
        dropped since the previous flush; see ``stats()`` for what was lost.
        """
        if self._compile_registered:
            from agents.torch import compile_events as ce

            ce.watcher().poll()
        return self._pipeline.flush(timeout_s)

    def shutdown(self) -> None:
        """Flush, stop the background exporters and unhook torch (idempotent)."""
        if self._closed:
            return
        if self._compile_registered:
            from agents.torch import compile_events as ce

            ce.watcher().unregister(self)
            self._compile_registered = False
        self._pipeline.flush(10.0)
        self._closed = True
        self._pipeline.shutdown()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a ratio between 0 and 1, got {value!r}")
    return float(value)

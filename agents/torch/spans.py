"""Lightweight spans that end straight into the SDK's batch processor.

Why not ``tracer.start_span``: the SDK's full span path (sampler, attribute
cleaning under a lock, span-limit bookkeeping, context objects) costs several
times the 50 us per-request budget of issue 3 for one request span and three
stage spans: 194-229 us of calling-thread CPU against 31-41 us for this path,
measured by ``benchmarks/instrumentation_overhead.py`` on the shared 2-core CI
machine (load average 8-10). A span here is a slotted object holding ids, a
start time and a plain dict of already type-checked attributes (see
``attributes.py``); ``end()`` turns it into the SDK's own ``ReadableSpan`` and
hands it to the handle's ``BatchSpanProcessor``, which batches and exports it
with the stock ``OTLPSpanExporter`` on its background thread.
Spans are always sampled: tail-latency diagnosis needs every request.

Ids come from a private ``random.Random`` seeded from ``os.urandom`` (and
reseeded after ``fork``): a lab that seeds the global ``random`` for
reproducibility must not make two replicas emit the same trace ids.
"""

from __future__ import annotations

import os
import random
import time
from typing import TYPE_CHECKING, Any, Mapping

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from agents.torch import context
from agents.torch.attributes import check_attributes, map_keywords

if TYPE_CHECKING:
    from agents.torch.handle import Handle

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_time_ns = time.time_ns
_UNSET = Status(StatusCode.UNSET)
_rng = random.Random(os.urandom(16))


def _reseed() -> None:
    _rng.seed(os.urandom(16))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


def new_trace_id() -> int:
    tid = 0
    while not tid:
        tid = _rng.getrandbits(128)
    return tid


def new_span_id() -> int:
    sid = 0
    while not sid:
        sid = _rng.getrandbits(64)
    return sid


def to_ns(t: float | None) -> int:
    """Unix seconds (float) or None (now) -> integer nanoseconds."""
    if t is None:
        return _time_ns()
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"times are unix seconds (float), got {t!r}")
    # Microseconds: a float near 1.7e9 s cannot hold nanoseconds exactly, and
    # the store keeps microseconds.
    return round(t * 1e6) * 1000


class Span:
    """One span being recorded: ids, start, attributes; exported on ``end()``.

    Usable as a context manager (``with h.request(...) as req``): entering
    makes it the active span of the thread (compile spans nest under it;
    stage spans have ``activates=False`` and do not), leaving ends it and marks
    it as an error if an exception escaped.
    """

    __slots__ = (
        "_handle",
        "name",
        "kind",
        "trace_id_int",
        "span_id_int",
        "parent",
        "start_ns",
        "attributes",
        "links",
        "status",
        "end_ns",
        "activates",
        "_ctx",
    )

    def __init__(
        self,
        handle: Handle,
        name: str,
        kind: SpanKind,
        parent: Span | SpanContext | None,
        attributes: dict[str, Any],
        start_ns: int,
        activates: bool = True,
    ) -> None:
        self._handle = handle
        self.activates = activates  # `with span:` makes it the thread's active span
        self._ctx: SpanContext | None = None
        self.name = name
        self.kind = kind
        if parent is None:
            self.trace_id_int = new_trace_id()
            self.parent: SpanContext | None = None
        elif isinstance(parent, Span):
            self.trace_id_int = parent.trace_id_int
            self.parent = parent.context
        elif isinstance(parent, SpanContext):
            self.trace_id_int = parent.trace_id
            self.parent = parent
        else:
            raise TypeError(f"parent must be a span from this instrumentation or None, got {parent!r}")
        self.span_id_int = new_span_id()
        self.start_ns = start_ns
        self.attributes = attributes
        self.links: list[Link] | None = None
        self.status = _UNSET
        self.end_ns: int | None = None

    # -- ids -------------------------------------------------------------
    @property
    def trace_id(self) -> str:
        """Lowercase hex, 32 characters."""
        return f"{self.trace_id_int:032x}"

    @property
    def span_id(self) -> str:
        """Lowercase hex, 16 characters."""
        return f"{self.span_id_int:016x}"

    @property
    def context(self) -> SpanContext:
        ctx = self._ctx
        if ctx is None:
            ctx = self._ctx = SpanContext(self.trace_id_int, self.span_id_int, False, _SAMPLED)
        return ctx

    @property
    def ended(self) -> bool:
        return self.end_ns is not None

    # -- recording ---------------------------------------------------------
    def set(self, attributes: Mapping[str, Any] | None = None, **keywords: Any) -> Span:
        """Set attributes by short keyword (``output_tokens=32``) or dotted name.

        Raises:
            TypeError: unknown keyword or wrong value type.
            RuntimeError: the span has already ended (its data was exported).
        """
        if self.end_ns is not None:
            raise RuntimeError(f"span {self.name!r} has already ended; set attributes before end()")
        if keywords:
            map_keywords(keywords, self.attributes)
        if attributes:
            check_attributes(attributes, self.attributes)
        return self

    def add_link(self, other: Span, attributes: Mapping[str, Any] | None = None) -> None:
        if self.end_ns is not None:
            raise RuntimeError(f"span {self.name!r} has already ended; add links before end()")
        if not isinstance(other, Span):
            raise TypeError(f"links point at spans from this instrumentation, got {other!r}")
        if self.links is None:
            self.links = []
        self.links.append(Link(other.context, dict(attributes) if attributes else None))

    def set_error(self, description: str) -> None:
        self.status = Status(StatusCode.ERROR, description[:512])

    def end(self, end_time: float | None = None) -> None:
        """End and export the span; ``end_time`` in unix seconds (default now).

        A second ``end()`` is ignored, as in OpenTelemetry.
        """
        if self.end_ns is not None:
            return
        end_ns = to_ns(end_time)
        if end_ns < self.start_ns:
            raise ValueError(
                f"span {self.name!r} would end before it started "
                f"(end {end_ns / 1e9:.6f} < start {self.start_ns / 1e9:.6f})"
            )
        self.end_ns = end_ns
        self._handle._export_span(self)

    def to_readable(self) -> ReadableSpan:
        pipeline = self._handle._pipeline
        return ReadableSpan(
            name=self.name,
            context=self.context,
            parent=self.parent,
            resource=pipeline.resource,
            attributes=self.attributes,
            links=self.links or (),
            kind=self.kind,
            instrumentation_scope=pipeline.scope,
            status=self.status,
            start_time=self.start_ns,
            end_time=self.end_ns,
        )

    # -- context manager ---------------------------------------------------
    def __enter__(self) -> Span:
        if self.activates:
            context.push(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.activates:
            context.pop(self)
        if exc_type is not None and self.status is _UNSET:
            self.set_error(f"{exc_type.__name__}: {exc}")
        self.end()

    def __repr__(self) -> str:
        return f"<Span {self.name} trace={self.trace_id} span={self.span_id}>"

"""In-process instrumentation for PyTorch serving code (docs/instrumentation.md).

``instrument(...)`` returns a handle that records request / stage / batch spans,
KV and replica events and the KV-usage gauge, and turns every torch.compile
compile and recompile into a compile span, exporting all of it over OTLP/HTTP
to a tailscope server. torch itself is imported only when compile hooks are
installed (``compile_events=True``), so importing this package is cheap.
"""

from __future__ import annotations

from agents.torch.attributes import SHORT_NAMES, STAGES
from agents.torch.handle import (
    EVENT_COMPILE_LIMIT,
    EVENT_KV_EVICTION,
    EVENT_REPLICA_READY,
    KV_USAGE_METRIC,
    Handle,
    instrument,
)
from agents.torch.spans import Span

__all__ = [
    "EVENT_COMPILE_LIMIT",
    "EVENT_KV_EVICTION",
    "EVENT_REPLICA_READY",
    "KV_USAGE_METRIC",
    "Handle",
    "SHORT_NAMES",
    "STAGES",
    "Span",
    "instrument",
]

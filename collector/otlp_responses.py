"""OTLP export responses, with partial success when some items were rejected.

OTLP says a server that drops part of a request answers success with
``partial_success`` counting what it dropped and why; the sender must not
retry those items (they would be rejected again).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collector.decoded import Decoded

# Keep the message readable: the first few reasons, then a count of the rest.
_MAX_REASONS = 5


def _message(errors: list[str]) -> str:
    head = "; ".join(errors[:_MAX_REASONS])
    more = len(errors) - _MAX_REASONS
    return f"{head}; and {more} more" if more > 0 else head


def export_response(signal: str, decoded: "Decoded | None") -> Any:
    """The ``Export{Trace,Metrics,Logs}ServiceResponse`` message for one request."""
    if signal == "traces":
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb

        resp = pb.ExportTraceServiceResponse()
        if decoded is not None and (decoded.rejected or decoded.errors):
            resp.partial_success.rejected_spans = int(decoded.rejected)
            resp.partial_success.error_message = _message(decoded.errors)
    elif signal == "metrics":
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as pb

        resp = pb.ExportMetricsServiceResponse()
        if decoded is not None and (decoded.rejected or decoded.errors):
            resp.partial_success.rejected_data_points = int(decoded.rejected)
            resp.partial_success.error_message = _message(decoded.errors)
    elif signal == "logs":
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as pb

        resp = pb.ExportLogsServiceResponse()
        if decoded is not None and (decoded.rejected or decoded.errors):
            resp.partial_success.rejected_log_records = int(decoded.rejected)
            resp.partial_success.error_message = _message(decoded.errors)
    else:
        raise ValueError(f"unknown OTLP signal {signal!r}")
    return resp


def encode_response(signal: str, decoded: "Decoded | None", as_json: bool) -> bytes:
    """Encode like the request was: OTLP/JSON (camelCase) or protobuf."""
    msg = export_response(signal, decoded)
    if as_json:
        from google.protobuf import json_format

        return json_format.MessageToJson(msg, indent=None).encode()
    return msg.SerializeToString()

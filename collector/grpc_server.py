"""OTLP over gRPC: the three ``Export`` services on ``grpc_port`` (4317).

vLLM's ``--otlp-traces-endpoint`` speaks gRPC by default, so this receiver
feeds the same ingest pipeline as OTLP/HTTP and answers only after the
commit. Status mapping follows the OTLP spec: UNAUTHENTICATED for a bad
token, RESOURCE_EXHAUSTED with a ``google.rpc.RetryInfo`` trailer when the
queue is full (the stock exporters retry it after that delay), UNAVAILABLE
when shutting down or the store is failing, INVALID_ARGUMENT for a body that
does not decode. gzip-compressed messages are decompressed by gRPC itself;
the receive limit (after decompression) is ``max_body_bytes``.

Generic method handlers with raw bytes in and out are used instead of
generated service stubs, so a body that fails to parse becomes
INVALID_ARGUMENT with a message rather than gRPC's opaque INTERNAL.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

import grpc

from collector.auth import BearerAuth
from collector.otlp_responses import export_response
from tailscope.errors import Overloaded, TailscopeError, Unauthorized, Unavailable

if TYPE_CHECKING:
    from collector.ingest import Ingest
    from tailscope.config import Config

log = logging.getLogger("tailscope.grpc")


# The three OTLP services; each has one unary method, Export.
SERVICES: dict[str, str] = {
    "traces": "opentelemetry.proto.collector.trace.v1.TraceService",
    "metrics": "opentelemetry.proto.collector.metrics.v1.MetricsService",
    "logs": "opentelemetry.proto.collector.logs.v1.LogsService",
}


def _retry_trailer(seconds: int) -> tuple[tuple[str, bytes], ...]:
    from google.protobuf.duration_pb2 import Duration
    from google.rpc.error_details_pb2 import RetryInfo

    info = RetryInfo(retry_delay=Duration(seconds=int(seconds)))
    return (("google.rpc.retryinfo-bin", info.SerializeToString()),)


def _status_for(exc: TailscopeError) -> grpc.StatusCode:
    if isinstance(exc, Unauthorized):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE
    if exc.status == 413:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INVALID_ARGUMENT


class GrpcReceiver:
    """The OTLP/gRPC server. ``start()`` binds ``config.grpc_port`` (0: a free port, see ``.port``).

    Args:
        ingest: the pipeline that stores what arrives.
        config: reads ``host``, ``grpc_port``, ``tokens``, ``max_body_bytes``, ``retry_after_s``.
        workers: handler threads; each waits for its request's commit, so this
            bounds concurrent gRPC exports (more get RESOURCE_EXHAUSTED).
    """

    def __init__(self, ingest: "Ingest", config: "Config", *, workers: int = 16) -> None:
        self.ingest = ingest
        self.config = config
        self.workers = workers
        self.auth = BearerAuth(config.tokens)
        self.port: int | None = None
        self.retry_after = int(config.retry_after_s)
        self._server: grpc.Server | None = None

    def _address(self) -> str:
        host = str(self.config.host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{int(self.config.grpc_port)}"

    def start(self) -> None:
        if self._server is not None:
            return
        limit = int(self.config.max_body_bytes)
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="tailscope-grpc"),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", 1 << 20),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=self.workers * 4,
        )
        handlers = []
        for signal, service in SERVICES.items():
            handler = grpc.unary_unary_rpc_method_handler(self._export_handler(signal))
            handlers.append(grpc.method_handlers_generic_handler(service, {"Export": handler}))
        server.add_generic_rpc_handlers(tuple(handlers))
        try:
            port = server.add_insecure_port(self._address())
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen for OTLP/gRPC on {self._address()}: {exc}") from None
        if not port:
            raise RuntimeError(f"cannot listen for OTLP/gRPC on {self._address()} (port in use?)")
        self.port = port
        server.start()
        self._server = server
        log.info("OTLP/gRPC listening on %s (port %d)", self.config.host, port)

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking RPCs; those in flight get ``grace`` seconds (their commits finish)."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait(grace + 5)

    def _export_handler(self, signal: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        ingest = self.ingest
        metrics = ingest.metrics
        max_attribute_bytes = int(self.config.max_attribute_bytes)
        decoder = str(self.config.decoder)

        def export(raw: bytes, context: grpc.ServicerContext) -> bytes:
            status = "OK"
            try:
                metadata = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
                self.auth.check(metadata.get("authorization"))
                ingest.check_room()
                from collector import otlp

                # The raw message bytes go straight to the decoder (the same path as
                # OTLP/HTTP protobuf): no parse into stock classes and re-encode.
                decoded = otlp.decode(signal, raw, otlp.PROTOBUF, max_attribute_bytes=max_attribute_bytes, decoder=decoder)
                metrics.decoded(signal, decoded.accepted, decoded.rejected, decoded.truncated_values)
                ingest.put_blocking(decoded)
                return export_response(signal, decoded).SerializeToString()
            except TailscopeError as exc:
                code = _status_for(exc)
                status = code.name
                if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE) and exc.status != 413:
                    context.set_trailing_metadata(_retry_trailer(self.retry_after))
                context.abort(code, exc.message)
                raise  # unreachable: abort raises
            except Exception:
                status = "INTERNAL"
                log.exception("OTLP/gRPC %s export failed", signal)
                context.abort(grpc.StatusCode.INTERNAL, "internal error (details in the server log)")
                raise  # unreachable: abort raises
            finally:
                metrics.request(signal, "grpc", status, len(raw))

        return export

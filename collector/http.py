"""The collector's HTTP endpoints: OTLP/HTTP export, profiler uploads, ``/metrics``.

Order of work on an export request, cheapest refusal first: token (401),
queue room (429/503, before any body is read), declared and actual body size
(413, the stream is read with a cap and never buffered past it), then
decompress + decode off the event loop, then wait for the group commit. The
200 is sent only after the commit, so it means "on disk" (docs/durability.md).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.requests import ClientDisconnect

from collector.auth import BearerAuth
from collector.otlp_responses import encode_response
from tailscope.errors import BadRequest, PayloadTooLarge, TailscopeError

if TYPE_CHECKING:
    from collector.ingest import Ingest
    from tailscope.config import Config

SIGNALS = ("traces", "metrics", "logs")


async def read_capped(request: Request, limit: int, what: str = "request body") -> bytes:
    """The whole body, refusing (413) once it passes ``limit`` bytes — never buffering more."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(f"invalid Content-Length header: {declared!r}") from None
        if size > limit:
            raise PayloadTooLarge(f"{what} of {size} bytes is over the limit of {limit} bytes (max_body_bytes)")
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"{what} is over the limit of {limit} bytes (max_body_bytes)")
            chunks.append(chunk)
    except ClientDisconnect:
        # Nobody is left to answer; a 400 keeps it out of the 500s and their tracebacks.
        raise BadRequest(f"the client disconnected after {total} bytes of the {what}") from None
    return b"".join(chunks)


def make_router(ingest: "Ingest", config: "Config") -> APIRouter:
    """The collector's routes, bound to one ingest pipeline."""
    router = APIRouter()
    auth = BearerAuth(config.tokens)
    metrics = ingest.metrics
    limit = int(config.max_body_bytes)

    async def export(request: Request, signal: str) -> Response:
        status: int = 200
        nbytes = 0
        try:
            auth.check(request.headers.get("authorization"))
            ingest.check_room()
            body = await read_capped(request, limit)
            nbytes = len(body)
            content_type = request.headers.get("content-type", "")
            encoding = request.headers.get("content-encoding", "")
            t0 = time.perf_counter()
            try:
                decoded = await ingest.decoder.decode(signal, body, content_type, encoding)
            finally:
                metrics.decode_time(time.perf_counter() - t0)
            metrics.decoded(signal, decoded.accepted, decoded.rejected, decoded.truncated_values)
            await ingest.put(decoded)
            as_json = content_type.split(";")[0].strip().lower() == "application/json"
            return Response(
                encode_response(signal, decoded, as_json),
                media_type="application/json" if as_json else "application/x-protobuf",
            )
        except TailscopeError as exc:
            status = exc.status
            raise
        except BaseException:
            status = 500
            raise
        finally:
            metrics.request(signal, "http", status, nbytes)

    def route(signal: str) -> Callable[[Request], Any]:  # one named endpoint per signal, for the OpenAPI page
        async def endpoint(request: Request) -> Response:
            return await export(request, signal)

        endpoint.__name__ = f"otlp_export_{signal}"
        endpoint.__doc__ = f"OTLP/HTTP export of {signal} (protobuf or JSON, optional gzip); 200 once durably stored."
        return endpoint

    for signal in SIGNALS:
        router.add_api_route(f"/v1/{signal}", route(signal), methods=["POST"], include_in_schema=True)

    @router.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> PlainTextResponse:
        """The server's own figures in Prometheus text format."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # Draining on shutdown is the app lifespan's job (tailscope.server), which
    # stops every part after the last in-flight request was answered.

    from collector.profiler_uploads import add_routes as add_profiler_routes

    add_profiler_routes(router, ingest.store, config, metrics, auth)
    return router

"""The analyzer's HTTP API (spec section 10), a thin layer over :class:`Analyzer`.

Endpoints are plain ``def`` so FastAPI runs them on its thread pool: each
call gets its own DuckDB cursor and a slow analysis never blocks ingest's
event loop. Bad parameters raise ``BadRequest`` (400), unknown ids
``NotFound`` (404); both become ``{ok: false, error, status}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import APIRouter

    from analyzer.service import Analyzer


def make_router(analyzer: "Analyzer") -> "APIRouter":
    from fastapi import APIRouter, Query

    router = APIRouter(prefix="/api/v1", tags=["analyzer"])

    @router.get("/services")
    def services() -> dict[str, Any]:
        return {"services": analyzer.services()}

    @router.get("/latency")
    def latency(
        service: str | None = None,
        start: str | None = None,
        end: str | None = None,
        step: str | None = Query(None, description="window width, seconds"),
        model: str | None = None,
    ) -> dict[str, Any]:
        return analyzer.latency(service=service or None, start=start, end=end, step_s=step, model=model or None)

    @router.get("/incidents")
    def incidents(service: str | None = None, start: str | None = None, end: str | None = None) -> dict[str, Any]:
        return analyzer.incidents(service=service or None, start=start, end=end)

    @router.get("/incidents/{incident_id}")
    def incident(incident_id: str) -> dict[str, Any]:
        return analyzer.incident(incident_id)

    @router.get("/slow-requests")
    def slow_requests(
        service: str | None = None, start: str | None = None, end: str | None = None, limit: str = "100"
    ) -> dict[str, Any]:
        return analyzer.slow_requests(service=service or None, start=start, end=end, limit=limit)

    @router.get("/traces/{trace_id}")
    def trace(trace_id: str, around: str | None = None) -> dict[str, Any]:
        return analyzer.trace(trace_id, around=around or None)

    return router

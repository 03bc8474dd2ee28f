"""The errors a user of the server can see, and the one place they become responses.

Each error carries its HTTP status and a message phrased for the person who
sent the request. Anything else is a bug: 500 with a generic message, and the
traceback goes to the log only (never to the client).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("tailscope")


class TailscopeError(Exception):
    """Base of every error the server reports to its clients."""

    status: int = 400
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if headers is not None:
            self.headers = headers


class BadRequest(TailscopeError):
    """The request's parameters are invalid (bad time, unknown service, …)."""


class BadPayload(TailscopeError):
    """The body cannot be decoded as the message it claims to be."""


class PayloadTooLarge(TailscopeError):
    """The body is over the configured size limit."""

    status = 413


class Unauthorized(TailscopeError):
    """A bearer token is required and was missing or wrong."""

    status = 401


class Overloaded(TailscopeError):
    """The ingest queue is full; retry after the given delay."""

    status = 429


class Unavailable(TailscopeError):
    """The server cannot take data now (shutting down, store failing)."""

    status = 503


class NotFound(TailscopeError):
    """No such trace, incident, or resource."""

    status = 404


class ReadOnlyViolation(TailscopeError):
    """A SQL console statement would write or reach outside the store."""


class QueryInterrupted(TailscopeError):
    """A SQL console query ran past the time limit."""


class QueryError(TailscopeError):
    """A SQL console query failed (syntax, unknown column, …)."""


def error_body(status: int, message: str) -> dict[str, object]:
    return {"ok": False, "error": message, "status": status}


def install_error_handlers(app: "FastAPI") -> None:
    """Map every error to ``{ok: false, error, status}``; tracebacks only to the log."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(TailscopeError)
    async def _tailscope(request: Request, exc: TailscopeError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse(error_body(400, "; ".join(parts) or "invalid request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal error (details in the server log)"), status_code=500)

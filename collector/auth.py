"""Bearer-token check shared by the OTLP/HTTP, OTLP/gRPC and upload endpoints.

Tokens are compared with :func:`hmac.compare_digest` against every configured
token (no early exit), so response timing does not reveal how much of a
guessed token was right. With no tokens configured, ingest is open.
"""

from __future__ import annotations

import hmac
from typing import Callable

from starlette.requests import Request

from tailscope.errors import Unauthorized


class BearerAuth:
    """Checks an ``Authorization`` header value against the configured tokens."""

    def __init__(self, tokens: tuple[str, ...] | list[str]) -> None:
        self._tokens = [t.encode() for t in tokens if t]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def check(self, header: str | None) -> None:
        """Raise :class:`Unauthorized` unless ``header`` is ``Bearer <a configured token>``."""
        if not self._tokens:
            return
        if not header:
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("malformed Authorization header: expected 'Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
        given = token.strip().encode()
        ok = False
        for known in self._tokens:
            ok |= hmac.compare_digest(given, known)
        if not ok:
            raise Unauthorized("invalid bearer token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def changes_need_token(auth: BearerAuth) -> Callable[[Request], None]:
    """A FastAPI dependency: requests that change state (not GET/HEAD/OPTIONS) need a token."""

    def guard(request: Request) -> None:
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            auth.check(request.headers.get("authorization"))

    return guard

"""HMAC-SHA256 webhook signatures.

The signed message is ``timestamp + "." + body`` (the Stripe/Slack scheme):
including the timestamp lets a receiver refuse replays older than a few
minutes, and signing the exact bytes sent means no JSON re-serialisation can
break verification. Headers:

- ``X-Tailscope-Timestamp``: unix seconds, as an integer string.
- ``X-Tailscope-Signature``: ``sha256=<lowercase hex HMAC>``.
"""

from __future__ import annotations

import hashlib
import hmac
import time

TIMESTAMP_HEADER = "X-Tailscope-Timestamp"
SIGNATURE_HEADER = "X-Tailscope-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
EVENT_HEADER = "X-Tailscope-Event"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, timestamp + "." + body)."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def sign_headers(secret: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """The timestamp header always; the signature header when a secret is set."""
    ts = str(int(time.time() if now is None else now))
    headers = {TIMESTAMP_HEADER: ts}
    if secret:
        headers[SIGNATURE_HEADER] = signature(secret, ts, body)
    return headers


def verify(secret: str, timestamp: str, body: bytes, header: str, *, tolerance_s: float = 300, now: float | None = None) -> bool:
    """What a receiver does: constant-time compare, and refuse stale timestamps."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), header or "")

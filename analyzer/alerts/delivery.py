"""Sending the outbox: signed POSTs with timeouts, retries, backoff and jitter.

The evaluator writes outbox rows in the same transaction as the alert
transition; this module only sends them. A row is claimed with a short lease
(a conditional UPDATE that works on SQLite and PostgreSQL, so two servers
sharing a control database never send the same row at once), POSTed with the
stored body, and marked ``delivered`` on a 2xx. Transient failures (network
errors, timeouts, 408/425/429/5xx) are retried with exponential backoff and
full jitter; anything else fails the row at once with the reason kept in
``last_error``. Rows of one alert go to one webhook in order (an ``open`` is
never overtaken by its ``resolved``).

Redirects are followed only within the same origin (scheme, host, port): a
webhook must not be bounced to a host nobody configured. Logs name the
webhook id and host only: webhook URLs (Slack's, for one) are credentials.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import urljoin, urlsplit

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from analyzer.alerts import signing
from analyzer.alerts.models import Delivery, Webhook, utcnow

log = logging.getLogger("tailscope.alerts.delivery")

MAX_REDIRECTS = 3
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
USER_AGENT = "tailscope-alerts/0.1"


class WebhookRefused(Exception):
    """The URL or a redirect points somewhere alerts may not go."""


def validate_url(url: str, allow_hosts: Iterable[str] = ()) -> str:
    """Check a webhook URL; returns it stripped. Raises ``ValueError`` naming the problem."""
    url = (url or "").strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"webhook url must start with http:// or https://, got {redact(url)!r}")
    if not parts.hostname:
        raise ValueError(f"webhook url has no host: {redact(url)!r}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"webhook url has an invalid port: {redact(url)!r}") from None
    check_allowed(url, allow_hosts)
    return url


def host_allowed(url: str, allow_hosts: Iterable[str]) -> bool:
    """True when ``allow_hosts`` is empty or names the URL's host (``host``, ``host:port`` or ``*.domain``)."""
    allow = [h.strip().lower() for h in allow_hosts if h.strip()]
    if not allow:
        return True
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for entry in allow:
        if entry == host or entry == f"{host}:{port}":
            return True
        if entry.startswith("*.") and (host.endswith(entry[1:]) or host == entry[2:]):
            return True
    return False


def check_allowed(url: str, allow_hosts: Iterable[str]) -> None:
    if not host_allowed(url, allow_hosts):
        raise WebhookRefused(f"host {urlsplit(url).hostname!r} is not in --webhook-allow-hosts")


def redact(url: str) -> str:
    """``scheme://host:port/…`` — enough to tell webhooks apart, nothing that authenticates."""
    parts = urlsplit(url)
    if not parts.hostname:
        return "<no host>"
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    return f"{parts.scheme}://{netloc}/…" if (parts.path not in ("", "/") or parts.query) else f"{parts.scheme}://{netloc}/"


class _RedactRequestURLs(logging.Filter):
    """httpx logs ``HTTP Request: POST <full URL> …`` at INFO; webhook URLs are credentials.

    Installed once on the ``httpx`` logger when a Sender is built: it rewrites
    URL arguments of that logger's records to :func:`redact`'s form.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(redact(str(a)) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


_REDACTOR = _RedactRequestURLs()


def _install_redactor() -> None:
    logger = logging.getLogger("httpx")
    if _REDACTOR not in logger.filters:
        logger.addFilter(_REDACTOR)


def _origin(url: str) -> tuple[str, str, int]:
    p = urlsplit(url)
    return (p.scheme, (p.hostname or "").lower(), p.port or (443 if p.scheme == "https" else 80))


@dataclass
class SendResult:
    """What one attempt did: ``ok`` (2xx), ``retry`` (transient), else permanent failure."""

    ok: bool
    retry: bool
    status_code: int | None
    error: str | None
    retry_after_s: float | None = None


def post(client: httpx.Client, url: str, body: bytes, headers: dict[str, str], allow_hosts: Iterable[str]) -> SendResult:
    """One delivery attempt, following same-origin redirects only."""
    origin = _origin(url)
    target = url
    for _hop in range(MAX_REDIRECTS + 1):
        try:
            check_allowed(target, allow_hosts)
        except WebhookRefused as exc:
            return SendResult(False, False, None, str(exc))
        try:
            # streamed: only the first bytes of a reply are read (a receiver cannot make us buffer gigabytes)
            with client.stream("POST", target, content=body, headers=headers) as resp:
                head = _read_head(resp)
        except httpx.TimeoutException as exc:
            return SendResult(False, True, None, f"timeout: {exc.__class__.__name__}")
        except httpx.HTTPError as exc:
            return SendResult(False, True, None, f"{exc.__class__.__name__}: {_scrub(str(exc), url)}")
        if resp.is_redirect:
            location = resp.headers.get("location", "")
            nxt = urljoin(target, location)
            if _origin(nxt) != origin:
                return SendResult(False, False, resp.status_code, f"redirect to another host refused ({redact(nxt)})")
            target = nxt
            continue
        code = resp.status_code
        if 200 <= code < 300:
            return SendResult(True, False, code, None)
        retry_after = _retry_after(resp.headers.get("retry-after"))
        snippet = head.decode("utf-8", "replace")[:200].strip().replace("\n", " ")
        err = f"HTTP {code}" + (f": {snippet}" if snippet else "")
        return SendResult(False, code in RETRY_STATUSES, code, err, retry_after)
    return SendResult(False, False, None, f"more than {MAX_REDIRECTS} redirects")


def _read_head(resp: httpx.Response, limit: int = 4096) -> bytes:
    """The first ``limit`` bytes of the reply body; the rest is left unread (the connection is closed).

    Raw bytes, never decompressed (no decompression bomb); a compressed body gives no snippet.
    """
    if resp.headers.get("content-encoding", "identity").lower() not in ("", "identity"):
        return b""
    out = b""
    for chunk in resp.iter_raw():
        out += chunk
        if len(out) >= limit:
            break
    return out[:limit]


def _scrub(text: str, url: str) -> str:
    return text.replace(url, redact(url)) if url else text


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class Sender:
    """The outbox worker thread.

    Args:
        sessions: the control-plane session factory.
        allow_hosts: optional host allow-list (also checked on every redirect).
        timeout_s: per-attempt HTTP timeout (connect + read).
        max_attempts: attempts before a row is marked ``failed``.
        backoff_base_s / backoff_max_s: retry delay is
            ``uniform(d/2, d)`` with ``d = min(max, base * 2**(attempt-1))``.
        poll_s: how often due rows are looked for (``wake()`` cuts the wait).
        concurrency: sends in flight at once (one slow endpoint does not hold up the rest).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        allow_hosts: Iterable[str] = (),
        timeout_s: float = 10.0,
        max_attempts: int = 12,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 300.0,
        poll_s: float = 0.5,
        concurrency: int = 4,
        rng: random.Random | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        if timeout_s <= 0 or max_attempts < 1 or backoff_base_s < 0 or backoff_max_s < backoff_base_s or concurrency < 1:
            raise ValueError(
                f"invalid sender settings: timeout_s={timeout_s}, max_attempts={max_attempts}, "
                f"backoff_base_s={backoff_base_s}, backoff_max_s={backoff_max_s}, concurrency={concurrency}"
            )
        self.sessions = sessions
        self.allow_hosts = tuple(allow_hosts)
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.poll_s = poll_s
        self.concurrency = concurrency
        self.lease = dt.timedelta(seconds=timeout_s * (MAX_REDIRECTS + 1) + 30)
        self._rng = rng or random.Random()
        self._clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        _install_redactor()
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False, headers={"User-Agent": USER_AGENT}, trust_env=False)
        self._pool: ThreadPoolExecutor | None = None
        self.sent = 0
        self.failed_attempts = 0

    # --- lifecycle --------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="tailscope-alert-send")
        self._thread = threading.Thread(target=self._loop, name="tailscope-alert-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop polling; sends in flight finish (bounded by the HTTP timeout)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout if timeout is not None else self.timeout_s * (MAX_REDIRECTS + 1) + 5)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def close(self) -> None:
        self.stop()
        self._client.close()

    def wake(self) -> None:
        """Look for due rows now (the evaluator just enqueued some)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # the loop must survive a database hiccup
                log.exception("alert outbox pass failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    # --- one pass ---------------------------------------------------------
    def claim_due(self, limit: int = 100) -> list[int]:
        """Lease the rows that are due, keeping per (alert, webhook) order."""
        now = self._clock()
        claimed: list[int] = []
        with self.sessions() as s:
            rows = s.execute(
                select(Delivery.id, Delivery.alert_id, Delivery.webhook_id, Delivery.next_attempt_at, Delivery.lease_until)
                .where(Delivery.status == "pending")
                .order_by(Delivery.id)
                .limit(1000)
            ).all()
            blocked: set[tuple[int, int | None]] = set()
            candidates: list[int] = []
            for row_id, alert_id, webhook_id, due, lease in rows:
                if alert_id is not None:
                    pair = (alert_id, webhook_id)
                    if pair in blocked:
                        continue
                    blocked.add(pair)
                if due > now or (lease is not None and lease > now):
                    continue
                candidates.append(row_id)
                if len(candidates) >= limit:
                    break
            for row_id in candidates:
                res = s.execute(
                    update(Delivery)
                    .where(Delivery.id == row_id, Delivery.status == "pending", or_(Delivery.lease_until.is_(None), Delivery.lease_until <= now))
                    .values(lease_until=now + self.lease)
                )
                if res.rowcount == 1:
                    claimed.append(row_id)
            s.commit()
        return claimed

    def run_once(self) -> int:
        """Send every due row once; returns how many attempts were made."""
        ids = self.claim_due()
        if not ids:
            return 0
        if self._pool is None or len(ids) == 1:
            for i in ids:
                self._attempt(i)
        else:
            list(self._pool.map(self._attempt, ids))
        return len(ids)

    def backoff(self, attempts: int, retry_after_s: float | None = None) -> float:
        """Seconds before the next attempt after ``attempts`` failures (full jitter, capped)."""
        d = min(self.backoff_max_s, self.backoff_base_s * (2 ** max(0, attempts - 1)))
        delay = self._rng.uniform(d / 2, d) if d > 0 else 0.0
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.backoff_max_s))
        return delay

    def _attempt(self, delivery_id: int) -> None:
        with self.sessions() as s:
            d = s.get(Delivery, delivery_id)
            if d is None or d.status != "pending":
                return
            hook = s.get(Webhook, d.webhook_id) if d.webhook_id is not None else None
            if hook is None:
                d.status, d.lease_until, d.last_error = "cancelled", None, "webhook deleted"
                s.commit()
                return
            url, secret, body, key, event = hook.url, hook.secret, d.body.encode("utf-8"), d.idempotency_key, d.event
            attempt_no = d.attempts + 1
        result = self.send(url, secret, body, event=event, idempotency_key=key, delivery_id=delivery_id, attempt=attempt_no)
        now = self._clock()
        with self.sessions() as s:
            d = s.get(Delivery, delivery_id)
            if d is None:
                return
            d.attempts = attempt_no
            d.last_status_code = result.status_code
            d.lease_until = None
            if result.ok:
                d.status, d.delivered_at, d.last_error = "delivered", now, None
                self.sent += 1
                log.info("alert delivery %s (%s) to webhook %s at %s: delivered", d.id, event, hook_id_of(d), redact(url))
            else:
                self.failed_attempts += 1
                d.last_error = (result.error or "failed")[:1000]
                if result.retry and attempt_no < self.max_attempts:
                    wait = self.backoff(attempt_no, result.retry_after_s)
                    d.next_attempt_at = now + dt.timedelta(seconds=wait)
                    log.warning("alert delivery %s to webhook %s at %s failed (%s); retry %d in %.1fs", d.id, hook_id_of(d), redact(url), d.last_error, attempt_no + 1, wait)
                else:
                    d.status = "failed"
                    log.error("alert delivery %s to webhook %s at %s failed for good after %d attempt(s): %s", d.id, hook_id_of(d), redact(url), attempt_no, d.last_error)
            s.commit()

    def send(self, url: str, secret: str, body: bytes, *, event: str, idempotency_key: str, delivery_id: int | None = None, attempt: int = 1) -> SendResult:
        """One signed POST (also used for test-sends)."""
        headers = {
            "Content-Type": "application/json",
            signing.EVENT_HEADER: event,
            signing.IDEMPOTENCY_HEADER: idempotency_key,
            "X-Tailscope-Attempt": str(attempt),
        }
        if delivery_id is not None:
            headers["X-Tailscope-Delivery"] = str(delivery_id)
        headers.update(signing.sign_headers(secret, body))
        return post(self._client, url, body, headers, self.allow_hosts)


def hook_id_of(d: Delivery) -> str:
    return str(d.webhook_id)

"""Delivery: a bounded in-memory queue → batches → the disk spool → OTLP/HTTP.

Sources never block on the network: they ``submit`` into a bounded queue that
drops and counts when full (sentry-python's worker pattern). One sender thread
batches what arrived, encodes it as OTLP protobuf, writes it to the
:class:`~agents.spool.Spool` and then drains the spool oldest first:

- 2xx: the payload is removed (only now);
- connection errors, 408, 429, 5xx: kept; retried after ``Retry-After`` when
  the server sent one, else after an exponential backoff with full jitter;
- 401/403: the token is wrong, not the payload: kept and retried at the
  longest backoff, with one loud message (dropping everything because of a
  configuration mistake would lose data that a fixed token would deliver);
- any other 4xx (400 bad payload, 413 too large, 404 wrong URL path): the
  server will never take it, so it is a poison payload: logged once per
  status and dropped, counted.

The counters go out as the agent's own metrics ``tailscope.agent.spool.*``
with the next batch.
"""

from __future__ import annotations

import email.utils
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import httpx

from agents.otlp_encode import LogEvent, MetricPoint, encode_logs, encode_metrics
from agents.spool import Spool, SpoolItem

log = logging.getLogger("tailscope.agent.sender")

__all__ = ["ItemQueue", "Sender", "classify", "retry_after_seconds", "upload_profiler_trace", "UploadResult"]

RETRYABLE = frozenset({408, 429})
AUTH = frozenset({401, 403})


def classify(status: int) -> str:
    """``ok`` (2xx), ``retry`` (408, 429, 5xx), ``auth`` (401, 403) or ``poison`` (any other status)."""
    if 200 <= status < 300:
        return "ok"
    if status in RETRYABLE or status >= 500:
        return "retry"
    if status in AUTH:
        return "auth"
    return "poison"


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Parse ``Retry-After`` (delta-seconds or an HTTP date); ``None`` when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class ItemQueue:
    """A bounded queue sources put items into; never blocks, drops and counts when full."""

    def __init__(self, maxsize: int = 20_000) -> None:
        if maxsize <= 0:
            raise ValueError(f"queue size must be > 0, got {maxsize}")
        self._q: queue.Queue[Any] = queue.Queue(maxsize)
        self.dropped = 0
        self._lock = threading.Lock()

    def submit(self, item: Any) -> bool:
        try:
            self._q.put_nowait(item)
            return True
        except queue.Full:
            with self._lock:
                self.dropped += 1
                first = self.dropped == 1
            if first:
                log.warning("agent queue full (%d items): dropping new items until the sender catches up", self._q.maxsize)
            return False

    def get(self, timeout: float) -> Any:
        return self._q.get(timeout=timeout)

    def get_nowait(self) -> Any:
        return self._q.get_nowait()

    def qsize(self) -> int:
        return self._q.qsize()


@dataclass
class Counters:
    sent_payloads: int = 0
    sent_bytes: int = 0
    poison_payloads: int = 0
    failures: int = 0
    spool_errors: int = 0  # payloads lost because the spool could not be written (disk full, permissions)


class Sender:
    """The sender thread (see the module docstring).

    Args:
        server: base URL, e.g. ``http://127.0.0.1:4318``.
        token: bearer token or ``None``.
        spool: the disk spool (shared with a previous run of the agent).
        items: the queue sources submit into.
        resource: the agent's resource, put on its own counters.
        batch_max: most items per payload.
        flush_interval: longest time an item waits in memory before it is spooled.
        timeout: per-request HTTP timeout (s).
        backoff_base / backoff_max: exponential backoff bounds (s).
    """

    def __init__(self, server: str, token: str | None, spool: Spool, items: ItemQueue, resource: Mapping[str, Any],
                 batch_max: int = 2000, flush_interval: float = 1.0, timeout: float = 10.0,
                 backoff_base: float = 0.5, backoff_max: float = 30.0,
                 client: httpx.Client | None = None) -> None:
        if batch_max <= 0:
            raise ValueError(f"batch_max must be > 0, got {batch_max}")
        self.server = server.rstrip("/")
        self.token = token
        self.spool = spool
        self.items = items
        self.resource = dict(resource)
        self.batch_max = batch_max
        self.flush_interval = flush_interval
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.client = client or httpx.Client(timeout=timeout, headers=self._headers())
        self.counters = Counters()
        self._attempt = 0
        self._next_try = 0.0  # monotonic time of the next send attempt
        self._outage_since: float | None = None
        self._poison_logged: set[int] = set()
        self._auth_logged = False
        self._stop = threading.Event()
        self._flush_now = threading.Event()
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._pending: list[Any] = []
        self._pending_since = 0.0
        # flush() asks through _flush_now and the sender thread answers through
        # _flushed once it sees nothing in memory and nothing spooled: the
        # thread alone reads its own state, so no lock is polled (polling a lock
        # this thread re-takes at once starved flush() for minutes).
        self._flushed = threading.Event()
        self._start_ns = time.time_ns()

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/x-protobuf", "User-Agent": "tailscope-agent/0.1"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    # --- batching ---------------------------------------------------------------
    def own_metrics(self, now_ns: int) -> list[MetricPoint]:
        """The agent's delivery counters (spec: ``tailscope.agent.spool.dropped/.bytes/.sent``)."""
        r, s = self.resource, self._start_ns
        dropped = {
            "spool_full": self.spool.dropped_payloads,
            "poison": self.counters.poison_payloads,
            "queue_full": self.items.dropped,
            "spool_error": self.counters.spool_errors,
        }
        pts = [MetricPoint.make("tailscope.agent.spool.dropped", n, now_ns, {"reason": reason}, r, kind="sum",
                                monotonic=True, start_time_unix_nano=s, unit="1")
               for reason, n in dropped.items()]
        pts.append(MetricPoint.make("tailscope.agent.spool.bytes", self.spool.bytes, now_ns, {}, r, unit="By"))
        pts.append(MetricPoint.make("tailscope.agent.spool.sent", self.counters.sent_payloads, now_ns, {}, r, kind="sum",
                                    monotonic=True, start_time_unix_nano=s, unit="1"))
        return pts

    def _spool_pending(self) -> None:
        """Encode what is in memory into payloads and write them to the spool."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        metrics = [i for i in batch if isinstance(i, MetricPoint)]
        logs = [i for i in batch if isinstance(i, LogEvent)]
        if metrics:
            metrics.extend(self.own_metrics(time.time_ns()))
        for start in range(0, len(metrics), self.batch_max):
            self._put("metrics", encode_metrics(metrics[start:start + self.batch_max]))
        for start in range(0, len(logs), self.batch_max):
            self._put("logs", encode_logs(logs[start:start + self.batch_max]))

    def _put(self, kind: str, payload: bytes) -> None:
        try:
            self.spool.put(kind, payload)
        except OSError as exc:  # disk full, permissions: count it, say it, keep the agent alive
            self.counters.spool_errors += 1
            if self.counters.spool_errors == 1 or self.counters.spool_errors % 100 == 0:
                log.error("cannot write to the spool %s (%s); %d payload(s) lost so far "
                          "(tailscope.agent.spool.dropped{reason=spool_error})", self.spool.dir, exc,
                          self.counters.spool_errors)

    def _gather(self, timeout: float) -> None:
        try:
            item = self.items.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(item)
        while len(self._pending) < self.batch_max:
            try:
                self._pending.append(self.items.get_nowait())
            except queue.Empty:
                break

    # --- sending ----------------------------------------------------------------
    def send_one(self, item: SpoolItem) -> str:
        """POST one spooled payload; returns ``ok``, ``retry``, ``poison`` or ``gone`` and updates the spool."""
        try:
            payload = item.read()
        except FileNotFoundError:  # dropped as oldest by a concurrent put (already counted there)
            self.spool.remove(item)
            return "gone"
        url = f"{self.server}/v1/{item.kind}"
        try:
            resp = self.client.post(url, content=payload, headers=self._headers())
        except httpx.HTTPError as exc:
            self._failed(f"{type(exc).__name__}: {exc}", None)
            return "retry"
        verdict = classify(resp.status_code)
        if verdict == "ok":
            self.spool.remove(item)
            self.counters.sent_payloads += 1
            self.counters.sent_bytes += item.size
            self._attempt = 0
            self._auth_logged = False
            if self._outage_since is not None:
                log.warning("server %s reachable again after %.1f s; draining %d spooled payloads",
                            self.server, time.monotonic() - self._outage_since, len(self.spool))
                self._outage_since = None
        elif verdict == "retry":
            self._failed(f"HTTP {resp.status_code}", retry_after_seconds(resp.headers.get("Retry-After")))
        elif verdict == "auth":
            if not self._auth_logged:
                self._auth_logged = True
                log.error("server %s refused the agent's token (HTTP %d): check --token / TAILSCOPE_TOKEN; "
                          "payloads stay in the spool and are retried every %.0f s", self.server, resp.status_code,
                          self.backoff_max)
            self._failed(f"HTTP {resp.status_code}", self.backoff_max)
            return "retry"
        else:
            self.spool.remove(item)
            self.counters.poison_payloads += 1
            if resp.status_code not in self._poison_logged:
                self._poison_logged.add(resp.status_code)
                log.error("server refused a %s payload with HTTP %d (%s); dropped it and will drop others like it "
                          "(counted in tailscope.agent.spool.dropped{reason=poison})",
                          item.kind, resp.status_code, resp.text[:200].replace("\n", " "))
        return verdict

    def _failed(self, why: str, retry_after: float | None) -> None:
        self.counters.failures += 1
        self._attempt += 1
        if retry_after is not None:
            delay = retry_after + random.uniform(0, min(1.0, self.backoff_base))
        else:  # exponential backoff, full jitter (AWS architecture blog), never below a small floor
            cap = min(self.backoff_max, self.backoff_base * (2 ** min(self._attempt - 1, 20)))
            delay = max(0.05, random.uniform(0, cap))
        self._next_try = time.monotonic() + delay
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("cannot deliver to %s (%s); spooling to %s and retrying with backoff", self.server, why, self.spool.dir)

    def drain(self, budget_s: float = 1.0) -> int:
        """Send spooled payloads oldest first until one fails, the spool is empty, or the budget is spent."""
        sent = 0
        end = time.monotonic() + budget_s
        while time.monotonic() < end and time.monotonic() >= self._next_try:
            item = self.spool.oldest()
            if item is None:
                break
            verdict = self.send_one(item)
            if verdict == "retry":
                break
            sent += verdict == "ok"
        return sent

    # --- the thread ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tailscope-agent-sender", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            now = time.monotonic()
            waits = [0.5]
            if self._pending:
                waits.append(self._pending_since + self.flush_interval - now)
            if len(self.spool):
                waits.append(self._next_try - now)
            try:
                flushing = self._flush_now.is_set()
                in_memory = bool(self._pending) or self.items.qsize() > 0
                self._gather(0.0 if stopping or (flushing and in_memory) else min(waits))
                due = self._pending and (len(self._pending) >= self.batch_max or flushing
                                         or stopping or time.monotonic() - self._pending_since >= self.flush_interval)
                if due:
                    self._spool_pending()
                if len(self.spool) and time.monotonic() >= self._next_try:
                    self.drain(budget_s=2.0)
                if flushing and not self._pending and self.items.qsize() == 0 and not len(self.spool):
                    self._flush_now.clear()
                    self._flushed.set()
            except Exception:  # noqa: BLE001 - the sender must survive a bad batch or a full disk
                log.exception("sender iteration failed")
                self._stop.wait(1.0)
            if stopping and not self._pending and self.items.qsize() == 0:
                # final drain against the deadline; whatever is left stays spooled for the next run
                while len(self.spool) and time.monotonic() < self._deadline:
                    wait = self._next_try - time.monotonic()
                    if wait > 0:
                        if time.monotonic() + wait >= self._deadline:
                            break
                        time.sleep(wait)
                    self.drain(budget_s=max(0.0, self._deadline - time.monotonic()))
                return

    def _spool_in_memory(self) -> None:
        """Without the thread: move everything queued and pending to the spool."""
        while self.items.qsize():
            self._gather(0.0)
        self._spool_pending()

    def flush(self, timeout: float = 10.0) -> bool:
        """Spool what is queued now and wait until the spool is empty; ``True`` when it got there in time."""
        if self._thread is None or not self._thread.is_alive():  # no thread to ask: do it here
            self._spool_in_memory()
            end = time.monotonic() + timeout
            while len(self.spool) and time.monotonic() < end:
                time.sleep(max(0.0, min(self._next_try - time.monotonic(), end - time.monotonic())))
                self.drain(budget_s=max(0.0, end - time.monotonic()))
            return not len(self.spool)
        self._flushed.clear()
        self._flush_now.set()
        return self._flushed.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after spooling everything in memory and trying to drain the spool until ``timeout``."""
        self._deadline = time.monotonic() + timeout
        self._next_try = 0.0  # one immediate attempt even in the middle of a long backoff
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout + 2.0)
        else:  # never started: still spool what is in memory
            self._spool_in_memory()
        self.client.close()


@dataclass(frozen=True)
class UploadResult:
    verdict: str  # ok | retry | auth | poison
    status: int | None
    detail: str
    retry_after: float | None = None


def upload_profiler_trace(client: httpx.Client, server: str, token: str | None, path: Path,
                          fields: Mapping[str, str]) -> UploadResult:
    """``POST /api/v1/profiler-traces`` (multipart field ``file`` + form fields)."""
    headers = {"User-Agent": "tailscope-agent/0.1"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = server.rstrip("/") + "/api/v1/profiler-traces"
    ctype = "application/gzip" if path.name.endswith(".gz") else "application/json"
    try:
        with open(path, "rb") as f:
            resp = client.post(url, files={"file": (path.name, f, ctype)}, data=dict(fields), headers=headers)
    except httpx.HTTPError as exc:
        return UploadResult("retry", None, f"{type(exc).__name__}: {exc}")
    verdict = classify(resp.status_code)
    return UploadResult(verdict, resp.status_code, resp.text[:300],
                        retry_after_seconds(resp.headers.get("Retry-After")))



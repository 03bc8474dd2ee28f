"""``POST /api/v1/profiler-traces``: store uploaded PyTorch profiler (Kineto) traces.

A trace is a Chrome-trace JSON file (optionally gzipped) of 1-100 MB. It is
validated (gzip magic, JSON with a ``traceEvents`` list, sizes capped at
``max_profiler_bytes`` both as sent and after decompression, so a gzip bomb is
refused), stored content-addressed by sha256 under ``profiler_dir`` (default
``<db>.profiler/``) and fsynced before the row that points at it is
committed; so, as with OTLP ingest, a 200 means the file is on disk.

Uploads are idempotent: the row id is derived from the content hash and the
resource labels, so an agent that retries an upload whose answer it lost gets
the same id back instead of a duplicate row.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import tempfile
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, AsyncIterator

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from tailscope.errors import BadPayload, BadRequest, PayloadTooLarge, TailscopeError

if TYPE_CHECKING:
    from collector.auth import BearerAuth
    from collector.self_metrics import SelfMetrics
    from collector.store import Store
    from tailscope.config import Config

log = logging.getLogger("tailscope.ingest")

LABELS = ("host.name", "service.instance.id", "service.name")
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
_MAX_SUMMARY_BYTES = 1 << 20
# Kineto timestamps are µs; anything outside these years is not a real trace time.
_EARLIEST = datetime(2000, 1, 1)
_LATEST = datetime(2100, 1, 1)


def profiler_dir(config: "Config") -> Path:
    """Where trace files live: ``profiler_dir`` or ``<db>.profiler/`` beside the DuckDB file."""
    return Path(config.profiler_dir) if config.profiler_dir else Path(str(config.db) + ".profiler")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(fh: IO[bytes], is_gzip: bool, limit: int) -> bytes:
    """The JSON text, decompressed with a cap (a gzip bomb stops at ``limit`` bytes)."""
    fh.seek(0)
    if not is_gzip:
        data = fh.read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLarge(f"profiler trace is over the limit of {limit} bytes (max_profiler_bytes)")
        return data
    out = bytearray()
    try:
        with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
            while True:
                chunk = gz.read(_CHUNK)
                if not chunk:
                    break
                out += chunk
                if len(out) > limit:
                    raise PayloadTooLarge(
                        f"profiler trace decompresses to more than {limit} bytes (max_profiler_bytes)"
                    )
    except (OSError, EOFError, zlib.error) as exc:
        raise BadPayload(f"profiler trace is not valid gzip: {exc}") from None
    return bytes(out)


def _to_time(epoch_us: float) -> datetime | None:
    try:
        t = datetime(1970, 1, 1) + timedelta(microseconds=epoch_us)
    except (OverflowError, ValueError):
        return None
    return t if _EARLIEST <= t < _LATEST else None


def inspect_trace(text: bytes) -> tuple[int, datetime | None, datetime | None]:
    """(events, trace_start, trace_end) of a Chrome-trace JSON document.

    Event ``ts`` is µs from ``baseTimeNanoseconds`` when the file has it
    (SIGNALS.md: epoch µs = baseTimeNanoseconds/1000 + ts); older Kineto files
    carry epoch µs directly. Times that are not plausible are left NULL.
    """
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadPayload(f"profiler trace is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        raise BadPayload("profiler trace is not a Chrome trace: expected a JSON object with a 'traceEvents' list")
    events = doc["traceEvents"]
    lo: float | None = None
    hi: float | None = None
    for ev in events:
        if not isinstance(ev, dict) or ev.get("ph") == "M":
            continue
        ts = ev.get("ts")
        if isinstance(ts, str):
            try:
                ts = float(ts)
            except ValueError:
                continue
        if not isinstance(ts, (int, float)) or isinstance(ts, bool):
            continue
        dur = ev.get("dur")
        end = ts + dur if isinstance(dur, (int, float)) and not isinstance(dur, bool) and dur > 0 else ts
        lo = ts if lo is None or ts < lo else lo
        hi = end if hi is None or end > hi else hi
    if lo is None or hi is None:
        return len(events), None, None
    base = doc.get("baseTimeNanoseconds")
    if isinstance(base, (int, float)) and not isinstance(base, bool) and base > 0:
        offset = base / 1000.0
    elif lo > 1e14:  # already epoch µs (after 1973)
        offset = 0.0
    else:
        return len(events), None, None
    return len(events), _to_time(offset + lo), _to_time(offset + hi)


class _Incoming:
    """An upload being received: spooled to a temp file next to its final place, hashed on the way."""

    def __init__(self, directory: Path, limit: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.limit = limit
        self.file = tempfile.NamedTemporaryFile(dir=directory, prefix=".upload-", suffix=".part", delete=False)
        self.sha = hashlib.sha256()
        self.size = 0
        self.head = b""

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise PayloadTooLarge(f"profiler trace is over the limit of {self.limit} bytes (max_profiler_bytes)")
        if len(self.head) < 2:
            self.head = (self.head + chunk)[:2]
        self.sha.update(chunk)
        self.file.write(chunk)

    def discard(self) -> None:
        try:
            self.file.close()
        finally:
            Path(self.file.name).unlink(missing_ok=True)


async def _capped(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"upload is over the limit of {limit} bytes (max_profiler_bytes)")
        yield chunk


def add_routes(router: APIRouter, store: "Store", config: "Config", metrics: "SelfMetrics", auth: "BearerAuth") -> None:
    """Mount ``POST /api/v1/profiler-traces`` on ``router``."""
    directory = profiler_dir(config)
    limit = int(config.max_profiler_bytes)
    one_at_a_time = asyncio.Semaphore(1)  # parsing a 100 MB trace takes ~1 GB; never two at once

    @router.post("/api/v1/profiler-traces")
    async def upload_profiler_trace(request: Request) -> dict[str, Any]:
        """Upload a Kineto / Chrome-trace JSON file (multipart field ``file``, or a raw body with ``?filename=``).

        Resource labels ``host.name``, ``service.instance.id``, ``service.name``
        come as query parameters or form fields; ``summary`` (form field) is
        optional JSON computed by the agent.
        """
        status = 200
        try:
            auth.check(request.headers.get("authorization"))
            result = await _receive(request)
            return result
        except TailscopeError as exc:
            status = exc.status
            raise
        finally:
            metrics.request("profiler_traces", "http", status)

    async def _receive(request: Request) -> dict[str, Any]:
        labels: dict[str, str | None] = {k: request.query_params.get(k) for k in LABELS}
        filename = request.query_params.get("filename")
        summary_text: str | None = None
        content_type = request.headers.get("content-type", "")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit + _MAX_SUMMARY_BYTES:
            raise PayloadTooLarge(f"upload of {declared} bytes is over the limit of {limit} bytes (max_profiler_bytes)")
        incoming = _Incoming(directory, limit)
        try:
            if content_type.split(";")[0].strip().lower() == "multipart/form-data":
                from starlette.formparsers import MultiPartException, MultiPartParser

                parser = MultiPartParser(
                    request.headers,
                    _capped(request.stream(), limit + _MAX_SUMMARY_BYTES),
                    max_files=1,
                    max_fields=16,
                    max_part_size=_MAX_SUMMARY_BYTES,
                )
                try:
                    form = await parser.parse()
                except MultiPartException as exc:
                    raise BadRequest(f"invalid multipart upload: {exc.message}") from None
                try:
                    upload = form.get("file")
                    if upload is None or isinstance(upload, str):
                        raise BadRequest("multipart upload needs a file field named 'file'")
                    filename = filename or upload.filename
                    for key in LABELS:
                        value = form.get(key)
                        if labels[key] is None and isinstance(value, str):
                            labels[key] = value
                    value = form.get("summary")
                    summary_text = value if isinstance(value, str) else None
                    while chunk := await upload.read(_CHUNK):
                        incoming.write(chunk)
                finally:
                    await form.close()
            else:
                try:
                    async for chunk in request.stream():
                        incoming.write(chunk)
                except ClientDisconnect:
                    raise BadRequest(f"the client disconnected after {incoming.size} bytes of the upload") from None
            if incoming.size == 0:
                raise BadRequest("empty upload: send the trace file as multipart field 'file' or as the request body")
            summary = _parse_summary(summary_text)
            async with one_at_a_time:
                return await run_in_threadpool(_finish, incoming, labels, filename, summary)
        finally:
            incoming.discard()  # no-op once _finish has moved the file into place

    def _finish(incoming: _Incoming, labels: dict[str, str | None], filename: str | None, summary: str | None) -> dict[str, Any]:
        incoming.file.flush()
        is_gzip = incoming.head == _GZIP_MAGIC
        events, start, end = inspect_trace(_read_json(incoming.file, is_gzip, limit))
        sha = incoming.sha.hexdigest()
        final = incoming.directory / (sha + (".json.gz" if is_gzip else ".json"))
        if not final.exists():
            os.fsync(incoming.file.fileno())
            incoming.file.close()
            os.replace(incoming.file.name, final)
            _fsync_dir(incoming.directory)
        trace_id = hashlib.sha256("\0".join([sha, *(labels[k] or "" for k in LABELS)]).encode()).hexdigest()[:32]
        cur = store.cursor()
        try:
            exists = cur.execute("SELECT 1 FROM profiler_traces WHERE id = ?", [trace_id]).fetchone()
        finally:
            cur.close()
        if not exists:
            store.execute_write(
                "INSERT INTO profiler_traces (id, received_at, host_name, service_instance_id, service_name, "
                "filename, path, size_bytes, sha256, trace_start, trace_end, summary) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [
                    trace_id,
                    datetime.now(timezone.utc).replace(tzinfo=None),
                    labels["host.name"],
                    labels["service.instance.id"],
                    labels["service.name"],
                    (filename or "")[:512] or None,
                    str(final),
                    incoming.size,
                    sha,
                    start,
                    end,
                    summary,
                ],
            )
            metrics.profiler_upload(incoming.size)
        return {
            "id": trace_id,
            "sha256": sha,
            "size_bytes": incoming.size,
            "events": events,
            "trace_start": start.isoformat() + "Z" if start else None,
            "trace_end": end.isoformat() + "Z" if end else None,
            "duplicate": bool(exists),
        }


def _parse_summary(text: str | None) -> str | None:
    if text is None or not text.strip():
        return None
    if len(text) > _MAX_SUMMARY_BYTES:
        raise PayloadTooLarge(f"summary is over {_MAX_SUMMARY_BYTES} bytes")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"summary is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("summary must be a JSON object")
    return json.dumps(value)
